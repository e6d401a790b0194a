"""wsss train-aff and refine --random-walk: confident labels, training and resume, the walk of the split.

The maths: tests/wsss/test_affinity.py (the walk of one image) and tests/wsss/test_refine.py (confident labels).
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import assert_one_line_error
from wsss.stages.cli import cli
from wsss import artifacts
from wsss.datasets.prepared import PreparedDataset
from wsss.models.classifier import CamNet
from wsss.refine import confident_label


@pytest.fixture(scope="module")
def cams(tiny_demo, tmp_path_factory):
    """CAMs of the tiny demo from an untrained ResNet-18 classifier (enough to exercise the stages)."""
    folder = tmp_path_factory.mktemp("aff")
    torch.manual_seed(0)
    net = CamNet("resnet18", num_classes=21).eval()
    dataset = PreparedDataset.load(tiny_demo)
    artifacts.save_checkpoint(folder / "cls" / "last.pth", {"model": net.state_dict(), "config": {},
                                                            "classes": dataset.classes, "arch": net.arch})
    result = CliRunner().invoke(cli, ["-q", "make-cam", "--root", str(tiny_demo), "--checkpoint",
                                      str(folder / "cls" / "last.pth"), "--out", str(folder / "cams"),
                                      "--scales", "1.0", "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 0, result.output
    return folder


def train_aff(root, cams_dir, out, *extra):
    return CliRunner().invoke(cli, ["train-aff", "--root", str(root), "--cams", str(cams_dir), "--out", str(out),
                                    "--backbone", "resnet18", "--weights", "none", "--embed-dim", "16",
                                    "--crop-size", "48", "--batch-size", "4", "--confident", "fixed",
                                    "--fg-thresh", "0.6", "--bg-thresh", "0.2", "--no-crf", "--device", "cpu",
                                    "--workers", "0", "--lr", "0.01", *extra])


def test_train_aff_labels_trains_resumes_and_feeds_the_walk(tiny_demo, cams, tmp_path):
    straight = tmp_path / "straight"
    result = train_aff(tiny_demo, cams / "cams", straight, "--epochs", "2")
    assert result.exit_code == 0, result.output
    dataset = PreparedDataset.load(tiny_demo)
    for image_id in dataset.ids("train"):  # the confident labels, re-made by hand from the CAM file
        keys, image_cams = artifacts.read_cam(artifacts.cam_path(cams / "cams", image_id))
        expected = confident_label(None, keys, image_cams, [0.6] * len(keys), [0.2] * len(keys))
        np.testing.assert_array_equal(artifacts.read_label_png(straight / "confident" / f"{image_id}.png"), expected)
    metrics = json.loads(artifacts.metrics_path(straight).read_text())
    assert metrics["finished"] and metrics["confident"]["thresholds"] == {"fg": 0.6, "bg": 0.2}
    assert {"loss", "loss_bg", "loss_fg", "loss_neg"} <= set(metrics["history"][-1])
    checkpoint = artifacts.load_checkpoint(artifacts.checkpoint_path(straight, "last"))
    assert checkpoint["arch"]["kind"] == "affinity" and checkpoint["arch"]["radius"] == 5

    resumed = tmp_path / "resumed"
    assert train_aff(tiny_demo, cams / "cams", resumed, "--epochs", "2", "--stop-after", "1").exit_code == 0
    assert train_aff(tiny_demo, cams / "cams", resumed, "--epochs", "2").exit_code == 0
    resumed_model = artifacts.load_checkpoint(artifacts.checkpoint_path(resumed, "last"))["model"]
    for name, tensor in checkpoint["model"].items():
        assert torch.equal(resumed_model[name], tensor), name
    # the SGD group is part of the schedule: another --lr cannot resume the run
    assert_one_line_error(train_aff(tiny_demo, cams / "cams", resumed, "--epochs", "2", "--lr", "0.02"),
                          "cannot resume", "--lr")

    out = tmp_path / "pseudo"
    command = ["-q", "refine", "--cams", str(cams / "cams"), "--root", str(tiny_demo), "--out", str(out),
               "--random-walk", str(straight), "--rw-steps", "16", "--threshold", "fixed", "--workers", "1",
               "--device", "cpu"]
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 0, result.output
    for image_id in dataset.ids("train"):
        keys, walked = artifacts.read_cam(artifacts.cam_path(out / "walked", image_id))
        original_keys, original = artifacts.read_cam(artifacts.cam_path(cams / "cams", image_id))
        assert keys.tolist() == original_keys.tolist() and walked.shape == original.shape
        assert np.allclose(walked.max(axis=(1, 2)), 1.0, atol=1e-3)
        assert artifacts.read_label_png(artifacts.label_path(out, image_id)).shape == original.shape[1:]
    # a second run reuses the walked CAMs; other walk settings in the same folder are refused
    first_id = dataset.ids("train")[0]
    before = artifacts.cam_path(out / "walked", first_id).stat().st_mtime_ns
    assert CliRunner().invoke(cli, command).exit_code == 0
    assert artifacts.cam_path(out / "walked", first_id).stat().st_mtime_ns == before
    result = CliRunner().invoke(cli, [*command[:-4], "--rw-steps", "8", "--workers", "1", "--device", "cpu"])
    assert_one_line_error(result, "walked with other settings")


def test_train_aff_errors(tiny_demo, tmp_path):
    result = train_aff(tiny_demo, tmp_path / "nowhere", tmp_path / "out")
    assert_one_line_error(result, "nowhere", "make-cam")
    # option checks come before any work: exit code 2, the option named
    result = train_aff(tiny_demo, tmp_path / "nowhere", tmp_path / "out", "--fg-thresh", "0.2", "--bg-thresh", "0.4")
    assert result.exit_code == 2 and "Invalid value for '--bg-thresh': 0.4: must not exceed --fg-thresh 0.2" \
        in result.output
    result = train_aff(tiny_demo, tmp_path / "nowhere", tmp_path / "out", "--momentum", "1")
    assert result.exit_code == 2 and "'--momentum': 1: must be < 1" in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(cli, ["-q", "refine", "--cams", str(tmp_path), "--root", str(tiny_demo), "--out",
                                      str(tmp_path / "p"), "--random-walk", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "Traceback" not in result.output
