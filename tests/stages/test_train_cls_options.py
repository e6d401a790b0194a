"""train-cls's regulariser options reach the library functions that act on them (what they change there is
tested in tests/wsss/test_losses.py)."""

import pytest
from click.testing import CliRunner

import wsss.losses
from wsss import artifacts
from wsss.stages.cli import cli


@pytest.fixture(scope="module")
def recorded_run(tiny_demo, tmp_path_factory):
    """A 2-step train-cls run with both regularisers on: the options of the CamObjective it built, every
    regulariser_ramp call and its metrics."""
    made, ramps = [], []
    real_ramp = wsss.losses.regulariser_ramp

    class RecordingObjective(wsss.losses.CamObjective):
        def __init__(self, model, **options):
            made.append(options)
            super().__init__(model, **options)

    def recording_ramp(step, total, start, length):
        ramps.append((step, total, start, length))
        return real_ramp(step, total, start, length)

    out = tmp_path_factory.mktemp("train_cls_options") / "cls"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(wsss.losses, "CamObjective", RecordingObjective)
        monkeypatch.setattr(wsss.losses, "regulariser_ramp", recording_ramp)
        result = CliRunner().invoke(cli, [
            "-q", "train-cls", "--root", str(tiny_demo), "--out", str(out), "--backbone", "resnet18", "--weights",
            "none", "--crop-size", "32", "--batch-size", "4", "--epochs", "1", "--val-split", "none", "--device", "cpu",
            "--workers", "0", "--threads", "1", "--er-weight", "0.5", "--er-target", "both", "--erase-weight", "0.5",
            "--erase-fill", "mean", "--erase-stop", "0.25", "--reg-start", "0.5", "--reg-ramp", "0.25"])
    assert result.exit_code == 0, result.output
    return made, ramps, artifacts.read_json(artifacts.metrics_path(out))


def test_er_target_and_erase_fill_reach_the_objective(recorded_run):
    made, _, _ = recorded_run
    assert len(made) == 1
    assert made[0]["er_target"] == "both" and made[0]["erase_fill"] == "mean" and made[0]["erase_stop"] == 0.25


def test_reg_start_and_ramp_reach_the_ramp_and_keep_the_regularisers_off_before_the_start(recorded_run):
    _, ramps, metrics = recorded_run
    # 8 images in batches of 4: steps 0 and 1 of 2, at 0 and 1/2 of the schedule, both before the ramp rises
    assert ramps == [(0, 2, 0.5, 0.25), (1, 2, 0.5, 0.25)]
    (record,) = [record for record in metrics["history"] if "round" in record]
    assert record["loss_er"] == 0.0 and record["loss_erase"] == 0.0 and record["loss"] == record["loss_cls"]
