"""train-seg's --select, --head-lr-mult, --poly-power and --threads reach the engine, the optimiser and the thread
set-up (what they do there is tested in tests/wsss/test_training.py, test_optim.py and test_device.py)."""

import numpy as np
import pytest
from click.testing import CliRunner

import wsss.device
from wsss import artifacts
from wsss.stages.cli import cli

LR, HEAD_LR_MULT, POLY_POWER, ITERATIONS = 0.01, 4.0, 2.0, 3


@pytest.fixture(scope="module")
def run(tiny_demo, tmp_path_factory):
    """A 3-iteration train-seg run on the ground truth, validated after every iteration: its output folder and the
    thread counts it set up."""
    out = tmp_path_factory.mktemp("train_seg_options") / "seg"
    threads = []
    real_configure_threads = wsss.device.configure_threads
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(wsss.device, "configure_threads",
                            lambda count, processes=1: threads.append(count) or real_configure_threads(count, processes))
        result = CliRunner().invoke(cli, [
            "-q", "train-seg", "--root", str(tiny_demo), "--labels", "gt", "--out", str(out), "--model",
            "deeplabv3_resnet18", "--weights", "none", "--crop-size", "32", "--batch-size", "2", "--iterations",
            str(ITERATIONS), "--eval-every", "1", "--select", "val-miou", "--lr", str(LR), "--head-lr-mult",
            str(HEAD_LR_MULT), "--poly-power", str(POLY_POWER), "--device", "cpu", "--workers", "0", "--threads", "1"])
    assert result.exit_code == 0, result.output
    return out, threads


def test_select_val_miou_keeps_the_round_with_the_best_val_miou(run):
    run, _ = run
    last = artifacts.load_checkpoint(artifacts.checkpoint_path(run, "last"))
    rounds = [record for record in last["history"] if "round" in record]
    scores = [record["val_miou"] for record in rounds]
    best_round = int(np.argmax(scores)) + 1  # the first of equal scores: a later round must score higher
    best = artifacts.load_checkpoint(artifacts.checkpoint_path(run, "best"))
    assert best["best"] == {"round": best_round, "step": best_round, "metric": "val_miou", "value": max(scores)}
    assert best["step"] == best_round
    assert artifacts.read_json(artifacts.metrics_path(run))["selected"] == best["best"]


def test_head_lr_mult_sets_the_heads_learning_rate(run):
    run, _ = run
    groups = artifacts.load_checkpoint(artifacts.checkpoint_path(run, "last"))["optimizer"]["param_groups"]
    assert [group["initial_lr"] for group in groups] == pytest.approx([LR, LR * HEAD_LR_MULT])


def test_poly_power_shapes_the_recorded_learning_rate(run):
    run, _ = run
    history = artifacts.load_checkpoint(artifacts.checkpoint_path(run, "last"))["history"]
    rounds = [record for record in history if "round" in record]
    # after step k of 3: 0.01 x (1 - k / 3)^2 = 0.01 x 4/9, 0.01 x 1/9, 0
    assert [record["step"] for record in rounds] == [1, 2, 3]
    assert [record["lr"] for record in rounds] == pytest.approx([LR * 4 / 9, LR / 9, 0.0])


def test_threads_reaches_the_thread_set_up(run):
    _, threads = run
    assert threads == [1]
