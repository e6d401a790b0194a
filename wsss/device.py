"""Device choice, seeding and distributed set-up (the only place that reads RANK/LOCAL_RANK/WORLD_SIZE)."""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

import numpy as np

from wsss.errors import WsssError

#: ``--device``: auto = CUDA when available, else the CPU.
DEVICES = ("auto", "cpu", "cuda")
#: ``--amp``: mixed precision (see :func:`wsss.training.resolve_precision`).
AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Read the torchrun environment (single process when unset)."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    world_size=int(os.environ.get("WORLD_SIZE", 1)))


def resolve_device(name: str):
    """Return a ``torch.device`` for ``auto|cpu|cuda`` (``cuda`` picks this process's LOCAL_RANK GPU)."""
    import torch

    if name not in DEVICES:
        raise WsssError(f"--device {name!r}: choose auto, cpu or cuda")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise WsssError("--device cuda: no CUDA device is available (use --device cpu)")
        return torch.device("cuda", dist_info().local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on GPU, gloo on CPU)."""
    import torch.distributed as dist

    info = dist_info()
    if info.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info


def sum_over_ranks(values, info: DistInfo, device) -> list[float]:
    """The sum of each value over all torchrun ranks (the values themselves in a single process).

    Args:
        values: a list of numbers or a 1-D tensor (kept on its device until the one read back).

    A collective call: every rank must reach it with the same number of values, so it also waits
    until every rank has got there.
    """
    import torch

    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
    if info.distributed:
        import torch.distributed as dist

        tensor = tensor.to(device=device, dtype=torch.float64)
        dist.all_reduce(tensor)
    return [float(value) for value in tensor.tolist()]


def mean_over_ranks(values, info: DistInfo, device) -> list[float]:
    """The mean of each value over all torchrun ranks (a collective call, see :func:`sum_over_ranks`)."""
    return [value / info.world_size for value in sum_over_ranks(values, info, device)]


def sum_array_over_ranks(array: np.ndarray, info: DistInfo, device) -> np.ndarray:
    """Element-wise sum of a numpy array over all torchrun ranks (confusion matrices, score tables).

    Integer arrays are reduced as int64 and float arrays as float64, so sums are exact for counts.
    A collective call (see :func:`sum_over_ranks`).
    """
    if not info.distributed:
        return array
    import torch
    import torch.distributed as dist

    dtype = torch.int64 if np.issubdtype(array.dtype, np.integer) else torch.float64
    tensor = torch.as_tensor(np.ascontiguousarray(array)).to(device=device, dtype=dtype)
    dist.all_reduce(tensor)
    return tensor.cpu().numpy().astype(array.dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for reproducible runs."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed derived from several integers (base seed, rank, epoch, index, ...), order-sensitive."""
    return int(np.random.SeedSequence([int(part) for part in parts]).generate_state(1)[0])


def shard(items: list, info: DistInfo | None = None, part: tuple[int, int] = (0, 1)) -> list:
    """This process's share of a list for per-image stages.

    First every ``n``-th item from ``i`` (``part = (i, n)``, the ``--shard i/n`` of a job array or
    of several machines), then, round-robin, this torchrun rank's share of that.
    """
    info = info or dist_info()
    index, count = part
    return items[index::count][info.rank::info.world_size]


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def parse_shard(text: str | None) -> tuple[int, int]:
    """Parse ``--shard i/n`` (0 <= i < n) into ``(i, n)``; None means ``(0, 1)``, the whole split."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise WsssError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise WsssError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def configure_threads(threads: int | None, processes: int = 1) -> int:
    """Set the threads of torch, OpenCV and BLAS for this process; return the count used.

    The policy of every stage: worker processes x threads stay within the cores this process
    may use.  ``--threads N`` is used as given.  Without it, a single process keeps torch's own
    count (all cores, or ``OMP_NUM_THREADS`` when set) and ``processes`` workers get an equal
    share each (at least 1).  DataLoader workers run one thread each (:func:`loader_worker_init`).
    """
    import cv2
    import torch
    from threadpoolctl import threadpool_limits

    if threads is not None and threads < 1:
        raise WsssError(f"--threads {threads}: must be at least 1")
    if threads is not None:
        count = threads
    elif processes > 1:
        count = max(1, default_workers() // processes)
    else:
        count = torch.get_num_threads()
    torch.set_num_threads(count)
    cv2.setNumThreads(count)
    threadpool_limits(limits=count)
    return count


def inference_loader_workers(workers: int, device: torch.device) -> int:
    """DataLoader workers for a pass of decode-then-forward over a split (make-cam, predict, validation).

    On a GPU the workers keep the device fed, so ``workers`` is used as asked.  On the CPU the
    network already runs one torch thread per core it was given (:func:`configure_threads`), and
    decoding an image costs a fraction of a percent of its multi-scale forward: workers there only
    take cores from the network (and cost a fork each pass).  So the CPU gets at most the cores left
    over by torch's threads, none by default (``--threads 1 --workers 1`` on two cores decodes in a worker).
    """
    import torch

    if device.type != "cpu":
        return workers
    return max(0, min(workers, default_workers() - torch.get_num_threads()))


# OpenCV's thread pool does not survive fork(): a child that changes the thread count (as every
# DataLoader and pool worker of wsss does) waits forever for the parent's pool threads, which the
# child does not have.  So the pool is stopped just before any fork (one thread) and restored in the
# parent after it; the child starts without a pool.  Seen with opencv-python-headless 5.0 on a
# GPU machine, where the bench's plain loops used OpenCV in the main process before a stage forked.
_OPENCV_THREADS_BEFORE_FORK: list[int] = []


def _stop_opencv_pool() -> None:
    cv2 = sys.modules.get("cv2")
    if cv2 is not None and hasattr(cv2, "setNumThreads"):
        _OPENCV_THREADS_BEFORE_FORK.append(cv2.getNumThreads())
        cv2.setNumThreads(1)


def _restore_opencv_pool() -> None:
    cv2 = sys.modules.get("cv2")
    if cv2 is not None and _OPENCV_THREADS_BEFORE_FORK:
        cv2.setNumThreads(_OPENCV_THREADS_BEFORE_FORK.pop())


def _forget_opencv_pool() -> None:
    _OPENCV_THREADS_BEFORE_FORK.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_stop_opencv_pool, after_in_parent=_restore_opencv_pool,
                        after_in_child=_forget_opencv_pool)


def loader_worker_init(worker_id: int) -> None:
    """DataLoader worker set-up: one thread each (decoding and augmentation are per image; the
    workers give the parallelism), and NumPy seeded from the worker's torch seed."""
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    np.random.seed(torch.initial_seed() % 2**32)


def stop_loader_workers(batches) -> None:
    """Shut down the worker processes of a DataLoader iterator now.

    After an error the traceback keeps the iterator alive; shutting its workers down later, when it
    is freed (after other workers may have been forked), waited seconds for each of them.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own clean-up of a multi-process iterator
    if shutdown is not None:
        shutdown()
