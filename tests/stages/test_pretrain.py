"""wsss pretrain: the backbone file, its use by train-cls and train-seg, errors, resume, and the probe."""

import json

import pytest
import torch
import torchvision
from click.testing import CliRunner

from helpers import assert_one_line_error
from toy_data import make_toy_dataset
from wsss.stages.cli import cli
from wsss import artifacts
from wsss.models.backbones import META_KEY
from wsss.models.classifier import CamNet

QUICK = ["--backbone", "resnet18", "--crop-size", "32", "--batch-size", "4", "--warmup-epochs", "1", "--lr", "0.05",
         "--device", "cpu", "--workers", "0", "--seed", "1"]


def pretrain(root, out, *extra):
    return CliRunner().invoke(cli, ["pretrain", "--root", str(root), "--out", str(out), *QUICK, *extra])


@pytest.mark.parametrize("method", [["--method", "contrastive"], ["--method", "contrastive", "--queue", "16"],
                                    ["--method", "rotation"]])
def test_backbone_file_is_a_torchvision_state_dict_with_metadata(tiny_demo, tmp_path, method):
    out = tmp_path / "pre"
    result = pretrain(tiny_demo, out, "--epochs", "2", *method)
    assert result.exit_code == 0, result.output
    state = torch.load(out / "backbone.pth", map_location="cpu", weights_only=True)
    meta = state.pop(META_KEY)
    assert meta["backbone"] == "resnet18" and meta["images"] == 8 and meta["epochs"] == 2
    assert meta["method"] == {"rotation": "rotation", "contrastive": "contrastive"}[method[1]] + (
        "-moco" if "--queue" in method else "")
    missing, unexpected = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and unexpected == []
    metrics = json.loads(artifacts.metrics_path(out).read_text())
    assert metrics["finished"] and metrics["epoch"] == 2 and len([h for h in metrics["history"] if "round" in h]) == 2
    # the linear probe scores the random initialisation and the pretrained trunk on val
    for which in ("random_init", "pretrained"):
        assert 0.0 <= metrics["probe"][which]["map"] <= 1.0
    if method[1] == "rotation":
        assert all(0.0 <= h["accuracy"] <= 1.0 for h in metrics["history"] if "round" in h)
    assert "linear-probe mAP" in result.output


def test_train_cls_and_train_seg_start_from_the_pretrained_trunk(tiny_demo, tmp_path):
    assert pretrain(tiny_demo, tmp_path / "pre", "--epochs", "1").exit_code == 0
    state = torch.load(tmp_path / "pre" / "backbone.pth", map_location="cpu", weights_only=True)
    # one epoch of train-cls at a negligible rate keeps the loaded weights: they must be the file's
    result = CliRunner().invoke(cli, ["train-cls", "--root", str(tiny_demo), "--out", str(tmp_path / "cls"),
                                      "--backbone", "resnet18", "--weights", str(tmp_path / "pre" / "backbone.pth"),
                                      "--crop-size", "32", "--batch-size", "4", "--epochs", "1", "--lr", "1e-12",
                                      "--freeze-bn", "--device", "cpu", "--workers", "0", "--val-split", "none"])
    assert result.exit_code == 0, result.output
    model = artifacts.load_checkpoint(artifacts.checkpoint_path(tmp_path / "cls", "last"))["model"]
    torch.testing.assert_close(model["backbone.0.weight"], state["conv1.weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(model["backbone.7.1.conv2.weight"], state["layer4.1.conv2.weight"], rtol=0, atol=1e-6)
    # and the same file initialises the DeepLab trunk
    from wsss.models.deeplab import build_seg_model

    seg = build_seg_model("deeplabv3_resnet18", 21, str(tmp_path / "pre" / "backbone.pth"))
    assert torch.equal(seg.backbone[4][0].conv1.weight, state["layer1.0.conv1.weight"])
    assert not torch.equal(CamNet("resnet18", 21).backbone[0].weight, state["conv1.weight"])


def test_wrong_backbone_is_one_line_naming_both(tiny_demo, tmp_path):
    assert pretrain(tiny_demo, tmp_path / "pre", "--epochs", "1").exit_code == 0
    result = CliRunner().invoke(cli, ["train-cls", "--root", str(tiny_demo), "--out", str(tmp_path / "cls"),
                                      "--backbone", "resnet50", "--weights", str(tmp_path / "pre" / "backbone.pth"),
                                      "--device", "cpu"])
    assert_one_line_error(result, "backbone.pth", "resnet18", "resnet50")
    assert result.exit_code == 1 and not (tmp_path / "cls" / "last.pth").exists()
    result = CliRunner().invoke(cli, ["train-seg", "--root", str(tiny_demo), "--out", str(tmp_path / "seg"),
                                      "--labels", "gt", "--model", "deeplabv3_resnet50", "--weights-backbone",
                                      str(tmp_path / "pre" / "backbone.pth"), "--device", "cpu"])
    assert_one_line_error(result, "backbone.pth", "resnet18", "resnet50")


def test_resume_after_a_stop_gives_the_file_of_a_clean_run(tiny_demo, tmp_path):
    assert pretrain(tiny_demo, tmp_path / "clean", "--epochs", "2").exit_code == 0
    assert pretrain(tiny_demo, tmp_path / "resumed", "--epochs", "2", "--stop-after", "1").exit_code == 0
    assert not (tmp_path / "resumed" / "backbone.pth").exists()  # written only when the schedule is done
    assert pretrain(tiny_demo, tmp_path / "resumed", "--epochs", "2").exit_code == 0
    clean = torch.load(tmp_path / "clean" / "backbone.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "backbone.pth", weights_only=True)
    assert clean.keys() == resumed.keys()
    for key, value in clean.items():
        if key != META_KEY:
            assert torch.equal(value, resumed[key]), key
    # finished: nothing is trained again
    before = (tmp_path / "resumed" / "last.pth").stat().st_mtime_ns
    assert pretrain(tiny_demo, tmp_path / "resumed", "--epochs", "2").exit_code == 0
    assert (tmp_path / "resumed" / "last.pth").stat().st_mtime_ns == before


def test_bad_options_are_one_line_errors(tiny_demo, tmp_path):
    result = pretrain(tiny_demo, tmp_path / "x", "--method", "rotation", "--queue", "8")
    assert_one_line_error(result, "'--queue'", "--method contrastive")
    assert result.exit_code == 2  # a usage error, found before any work
    result = pretrain(tiny_demo, tmp_path / "x", "--probe-split", "nosuch")
    assert_one_line_error(result, "--probe-split")


def test_rotation_learns_which_way_is_up_on_the_toy_data(tmp_path):
    """18 steps on toy images whose background is brighter at the top: the angle is named well above chance."""
    make_toy_dataset(tmp_path / "toy", num_train=24, num_val=24, size=48, upright=True)
    out = tmp_path / "pre"
    result = CliRunner().invoke(cli, [
        "pretrain", "--root", str(tmp_path / "toy"), "--out", str(out), "--method", "rotation", "--backbone",
        "resnet18", "--crop-size", "32", "--batch-size", "8", "--epochs", "6", "--warmup-epochs", "1", "--lr", "0.05",
        "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(artifacts.metrics_path(out).read_text())
    rounds = [record for record in metrics["history"] if "round" in record]
    assert rounds[-1]["loss"] < rounds[0]["loss"] / 2, [record["loss"] for record in rounds]
    # four angles: chance is 0.25 (an untrained trunk scores about that)
    assert rounds[-1]["accuracy"] >= 0.75, [record["accuracy"] for record in rounds]
    # The classes differ by colour, which the pooled features of a random trunk already separate (probe mAP about
    # 1.0); a trunk trained to read the background's brightness keeps most of it (about 0.97).  So the probe
    # cannot rise here: it must not fall far (constant scores would give the positive share, 2/3).
    probe = metrics["probe"]
    assert probe["pretrained"]["map"] >= probe["random_init"]["map"] - 0.05, probe
