"""Per-image work over a process pool, with a progress bar."""

from __future__ import annotations

import multiprocessing
import sys
from typing import Callable, Iterator, Sequence, TypeVar

from wsss.device import default_workers
from wsss.progress import bar as progress_bar


def pool_context() -> multiprocessing.context.BaseContext:
    """The start method of every process pool in wsss: fork on Linux, spawn elsewhere.

    fork starts workers at once.  forkserver/spawn re-import the main module in every worker
    (for the ``wsss`` script, the command line; for a script read from stdin, a file that does
    not exist, after which the pool restarts crashed workers forever).  Pools are started before
    any progress bar, whose monitor thread must not be forked.
    """
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


Task = TypeVar("Task")
Result = TypeVar("Result")


def imap_images(func: Callable[[Task], Result], tasks: Sequence[Task], workers: int | None = None,
                desc: str = "images") -> Iterator[Result]:
    """Apply ``func`` to every task in a process pool, in order, with a progress bar.

    Args:
        func: a picklable (module-level or ``functools.partial``) function of one task.
        tasks: the per-image work items.
        workers: processes to use; ``None`` = all cores, 0 or 1 = run in this process
            (also used when there is a single task, where a pool only costs start-up time).
        desc: label of the progress bar.

    Yields:
        ``func(task)`` for each task, in the order of ``tasks``.  An exception raised
        in a worker (e.g. :class:`WsssError` naming a bad file) is re-raised here.
    """
    workers = default_workers() if workers is None else workers
    workers = min(workers, len(tasks))
    if workers <= 1:
        for task in progress_bar(tasks, desc=desc, leave=False):
            yield func(task)
        return
    chunksize = max(1, min(64, len(tasks) // (workers * 8)))
    with pool_context().Pool(workers) as pool:
        with progress_bar(total=len(tasks), desc=desc, leave=False) as progress:
            for result in pool.imap(func, tasks, chunksize=chunksize):
                yield result
                progress.update()
