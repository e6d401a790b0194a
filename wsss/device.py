"""Device choice, seeding and distributed set-up (the only place that reads RANK/LOCAL_RANK/WORLD_SIZE)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np

from wsss.errors import WsssError


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

    if name not in ("auto", "cpu", "cuda"):
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


def sum_over_ranks(values: list[float], info: DistInfo, device) -> list[float]:
    """The sum of each value over all torchrun ranks (the values themselves in a single process).

    A collective call: every rank must reach it with the same number of values, so it also waits
    until every rank has got there.
    """
    if not info.distributed:
        return [float(value) for value in values]
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def mean_over_ranks(values: list[float], info: DistInfo, device) -> list[float]:
    """The mean of each value over all torchrun ranks (a collective call, see :func:`sum_over_ranks`)."""
    return [value / info.world_size for value in sum_over_ranks(values, info, device)]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for reproducible runs."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A 32-bit seed derived from several integers (base seed, rank, epoch, index, ...), order-sensitive."""
    return int(np.random.SeedSequence([int(part) for part in parts]).generate_state(1)[0])


def shard(items: list, info: DistInfo | None = None) -> list:
    """Return this rank's share of a list (round-robin), for per-image stages under torchrun."""
    info = info or dist_info()
    return items[info.rank::info.world_size]


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
