"""Collectives of wsss.device on a real two-process Gloo group (CPU)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wsss.device import DistInfo, mean_over_ranks, sum_over_ranks


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        info = DistInfo(rank=rank, local_rank=rank, world_size=world_size)
        # rank 0 saw losses 1 and 10, rank 1 saw 3 and 30: the means are 2 and 20 on every rank
        values = [1.0 + 2 * rank, 10.0 + 20 * rank]
        results[rank] = (mean_over_ranks(values, info, torch.device("cpu")),
                         sum_over_ranks(values, info, torch.device("cpu")))
    finally:
        dist.destroy_process_group()


def test_reductions_in_a_single_process_are_identities():
    assert mean_over_ranks([0.25, 3.0], DistInfo(), torch.device("cpu")) == [0.25, 3.0]
    assert sum_over_ranks([2, 5], DistInfo(), torch.device("cpu")) == [2.0, 5.0]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_mean_and_sum_over_two_gloo_processes():
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_rank_main, args=(2, _free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        means, sums = results[rank]
        assert means == pytest.approx([2.0, 20.0]) and sums == pytest.approx([4.0, 40.0])
