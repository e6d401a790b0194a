"""Fixtures shared by every test module."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run torch on one intra-op thread: on a busy 2-core machine more threads made tests many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A prepared demo dataset (VOC layout): 8 train and 4 val images, long side 48 px, seed 0.

    Session-scoped and shared: tests must write their outputs elsewhere (their own tmp_path).
    """
    from click.testing import CliRunner

    from wsss.stages.cli import cli

    out = tmp_path_factory.mktemp("tiny_demo")
    runner = CliRunner()
    result = runner.invoke(cli, ["-q", "demo-data", str(out), "--num-train", "8", "--num-val", "4", "--size", "48"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["-q", "prepare", "voc", "--root", str(out / "VOC2012"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    return out / "VOC2012"
