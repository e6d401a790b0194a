"""Per-image work over a process pool, with a progress bar: the one pool driver of wsss.

``prepare`` (mask conversion, image checks), ``eval`` (confusion matrices) and ``refine``
(GMM + CRF per image) all go through :func:`imap_images`.  Workers

* start with ``fork`` on Linux (no re-import of the command line) and ``spawn`` elsewhere;
* run one BLAS/OpenMP/OpenCV thread each, so workers x threads stay within the cores;
* end when their parent process dies (Linux ``PR_SET_PDEATHSIG``): a killed command leaves no
  worker behind that goes on writing files;
* are never killed by wsss itself: after an error the work not yet started is dropped and the
  running chunks finish (``multiprocessing.Pool.terminate`` could kill a worker holding the result
  queue's lock and hang the parent for ever).

An exception raised in a worker (e.g. a :class:`~wsss.errors.WsssError` naming a bad file) is
raised again in the parent by :mod:`multiprocessing`, with its type and message.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import itertools
import math
import multiprocessing
import os
import signal
import sys
from typing import Callable, Iterator, Sequence, TypeVar

from wsss.device import default_workers
from wsss.progress import bar as progress_bar

Task = TypeVar("Task")
Result = TypeVar("Result")


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


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _worker_start(initializer: Callable | None, initargs: tuple) -> None:
    from threadpoolctl import threadpool_limits

    _die_with_parent()
    # one thread per worker: the processes give the parallelism, and results do not depend on
    # how many threads a machine has
    threadpool_limits(limits=1)
    # OpenCV runs one thread here: the parent switched it off before forking (see _forking_safely);
    # reconfiguring OpenCV's pool in a forked child would wait forever for threads that were not copied
    if initializer is not None:
        initializer(*initargs)


@contextlib.contextmanager
def _forking_safely():
    """OpenCV at one thread while the pool's workers are forked, then back to the parent's setting.

    OpenCV's thread pool is not fork-safe: a forked child inherits its state but not its threads,
    and a child that then uses or reconfigures it waits forever.  Stopping the pool in the parent
    (where its threads exist) before the fork gives the children a single-threaded OpenCV.
    """
    cv2 = sys.modules.get("cv2")
    if cv2 is None:
        yield
        return
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


def process_executor(workers: int, initializer: Callable | None = None,
                     initargs: tuple = ()) -> concurrent.futures.ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``workers`` processes started now, under the policy above (fork on
    Linux with OpenCV quiet, one thread each, ending with their parent), for work submitted as it comes
    (e.g. predict's CRF on each batch's probabilities).  The caller shuts it down."""
    executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=pool_context(), initializer=_worker_start,
                                                      initargs=(initializer, initargs))
    with _forking_safely():
        executor.submit(int).result()  # with fork, the first task starts every worker
    return executor


def _run_chunk(func: Callable, chunk: list[tuple[int, Task]]) -> list[tuple[int, Result]]:
    return [(index, func(task)) for index, task in chunk]


def imap_images(func: Callable[[Task], Result], tasks: Sequence[Task], workers: int | None = None,
                desc: str = "images", *, initializer: Callable | None = None, initargs: tuple = (),
                ordered: bool = True, weights: Sequence[int] | None = None, chunksize: int | None = None,
                show: bool = True, leave: bool = False) -> Iterator[Result]:
    """Apply ``func`` to every task in a process pool, with a progress bar.

    Args:
        func: a picklable (module-level or ``functools.partial``) function of one task.
        tasks: the work items (an image, or a chunk of images).
        workers: processes; ``None`` = all cores, 0 or 1 = run in this process (also used for a
            single task, where a pool only costs start-up time).
        desc: label of the progress bar.
        initializer, initargs: run once in every worker (and once here when serial), e.g. to hand
            each worker a large read-only object once instead of with every task.
        ordered: yield results in the order of ``tasks``; False yields them as they finish.
        weights: progress-bar units per task (e.g. images per chunk); default 1 each.
        chunksize: tasks sent to a worker at a time (default: a few per worker).

    Yields:
        ``func(task)`` for each task.  An exception raised in a worker is raised here.
    """
    workers = default_workers() if workers is None else workers
    workers = min(workers, len(tasks))
    weights = list(weights) if weights is not None else [1] * len(tasks)
    with_bar = functools.partial(progress_bar, total=sum(weights), desc=desc, leave=leave, show=show)
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        with with_bar() as progress:
            for task, weight in zip(tasks, weights):
                yield func(task)
                progress.update(weight)
        return
    chunksize = chunksize or max(1, min(64, math.ceil(len(tasks) / (workers * 8))))
    indexed = list(enumerate(tasks))
    chunks = (indexed[start:start + chunksize] for start in range(0, len(indexed), chunksize))
    executor = process_executor(workers, initializer, initargs)
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    try:
        with with_bar() as progress:
            while True:
                # a bounded window of chunks in flight: results are not held for the whole split
                for chunk in itertools.islice(chunks, 4 * workers - len(pending)):
                    pending.append(executor.submit(_run_chunk, func, chunk))
                if not pending:
                    break
                if ordered:
                    future = pending.popleft()
                else:
                    done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    future = done.pop()
                    pending.remove(future)
                for index, result in future.result():
                    yield result
                    progress.update(weights[index])
    finally:
        # after an error (or when the caller stops early) the chunks not started are dropped and the
        # running ones finish: terminating workers mid-write (multiprocessing.Pool.terminate) could
        # leave a queue lock held and hang the parent
        executor.shutdown(wait=True, cancel_futures=True)
