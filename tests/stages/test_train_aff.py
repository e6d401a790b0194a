"""wsss train-aff and refine --random-walk: confident labels, training and resume, the walk of the split.

The maths: tests/wsss/test_affinity.py (the walk of one image) and tests/wsss/test_refine.py (confident labels).
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import assert_one_line_error
from toy_data import make_toy_dataset, read_masks
from wsss.stages.cli import cli
from wsss import artifacts
from wsss.affinity import TARGET_KINDS, affinity_targets, label_at_stride, pair_affinity, pair_offsets
from wsss.datasets.prepared import PreparedDataset
from wsss.inference import to_model_input
from wsss.models.affinity import load_affinity_net
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
        # the input CAMs pass the checks above too: the walk must have moved them
        assert np.abs(walked - original).max() > 0.1, image_id
        assert artifacts.read_label_png(artifacts.label_path(out, image_id)).shape == original.shape[1:]
    # a second run reuses the walked CAMs; other walk settings in the same folder are refused
    first_id = dataset.ids("train")[0]
    before = artifacts.cam_path(out / "walked", first_id).stat().st_mtime_ns
    assert CliRunner().invoke(cli, command).exit_code == 0
    assert artifacts.cam_path(out / "walked", first_id).stat().st_mtime_ns == before
    result = CliRunner().invoke(cli, [*command[:-4], "--rw-steps", "8", "--workers", "1", "--device", "cpu"])
    assert_one_line_error(result, "walked with other settings")


def test_train_aff_errors(tiny_demo, cams, tmp_path):
    result = train_aff(tiny_demo, tmp_path / "nowhere", tmp_path / "out")
    assert_one_line_error(result, "nowhere", "make-cam")
    # option checks come before any work: exit code 2, the option named
    result = train_aff(tiny_demo, tmp_path / "nowhere", tmp_path / "out", "--fg-thresh", "0.2", "--bg-thresh", "0.4")
    assert result.exit_code == 2 and "Invalid value for '--bg-thresh': 0.4: must not exceed --fg-thresh 0.2" \
        in result.output
    result = train_aff(tiny_demo, tmp_path / "nowhere", tmp_path / "out", "--momentum", "1")
    assert result.exit_code == 2 and "'--momentum': 1: must be < 1" in result.output
    assert not (tmp_path / "out").exists()
    # real CAMs, so that refine gets past its CAM check to the missing checkpoint, before it writes anything
    result = CliRunner().invoke(cli, ["-q", "refine", "--cams", str(cams / "cams"), "--root", str(tiny_demo), "--out",
                                      str(tmp_path / "p"), "--random-walk", str(tmp_path / "missing")])
    assert_one_line_error(result, "missing", "checkpoint not found")
    assert result.exit_code == 1 and not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- it learns


@pytest.fixture(scope="module")
def toy_affinity(tmp_path_factory):
    """An affinity network trained 12 steps on toy data (tests/toy_data.py), its CAMs the masks.

    Binary CAMs make the confident labels the masks themselves, so what is learned is known: high
    affinity inside the background and inside every object, low affinity across every object's edge.
    """
    folder = tmp_path_factory.mktemp("toy_aff")
    root = folder / "toy"
    splits = make_toy_dataset(root, num_train=24, num_val=8, size=64)
    for image_id, mask in read_masks(root, splits["train"]).items():
        keys = np.unique(mask[mask > 0])
        artifacts.write_cam(artifacts.cam_path(folder / "cams", image_id), keys,
                            np.stack([(mask == key).astype(np.float32) for key in keys]))
    result = CliRunner().invoke(cli, [
        "-q", "train-aff", "--root", str(root), "--cams", str(folder / "cams"), "--out", str(folder / "aff"),
        "--backbone", "resnet18", "--weights", "none", "--embed-dim", "32", "--crop-size", "64", "--scale-range",
        "0.8,1.2", "--batch-size", "8", "--epochs", "4", "--lr", "0.05", "--confident", "fixed", "--fg-thresh", "0.6",
        "--bg-thresh", "0.2", "--no-crf", "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 0, result.output
    return root, splits["val"], folder / "aff"


def test_learned_affinity_is_low_across_edges_and_high_inside_regions(toy_affinity):
    """On unseen images, pairs across an object's edge have less than half the affinity of pairs inside a region."""
    root, val_ids, aff = toy_affinity
    checkpoint = artifacts.load_checkpoint(artifacts.checkpoint_path(aff, "last"))
    model = load_affinity_net(checkpoint)
    dataset = PreparedDataset.load(root)
    offsets = pair_offsets(checkpoint["arch"]["radius"])
    pairs = {kind: [] for kind in TARGET_KINDS}
    for image_id, mask in read_masks(root, val_ids).items():  # images the network has not seen
        with torch.no_grad():
            image = to_model_input(torch.from_numpy(dataset.read_image("val", image_id))[None])
            affinity = pair_affinity(model(image), offsets)[0].numpy()
        targets = affinity_targets(label_at_stride(mask, model.stride), offsets)
        for kind in TARGET_KINDS:
            pairs[kind].append(affinity[targets[kind]])
    mean = {kind: float(np.concatenate(values).mean()) for kind, values in pairs.items()}
    # after 12 steps about 0.6 inside the background and the objects and 0.13 across edges; an untrained
    # network gives about 0.6 inside and 0.5-0.6 across (its features differ a little between grey and colour)
    assert mean["neg"] < 0.5 * min(mean["bg_pos"], mean["fg_pos"]), mean


def test_random_walk_fills_a_seeded_object_and_stops_at_its_edge(toy_affinity, tmp_path):
    """CAMs that cover the upper half of each object spread over the rest of it, and hardly beyond."""
    root, val_ids, aff = toy_affinity
    masks = read_masks(root, val_ids)
    for image_id, mask in masks.items():
        keys = np.unique(mask[mask > 0])
        seeds = []
        for key in keys:
            rows = np.flatnonzero((mask == key).any(axis=1))
            upper_half = np.arange(mask.shape[0])[:, None] < (rows[0] + rows[-1] + 1) // 2
            seeds.append(((mask == key) & upper_half).astype(np.float32))
        artifacts.write_cam(artifacts.cam_path(tmp_path / "seeds", image_id), keys, np.stack(seeds))
    out = tmp_path / "walked"
    result = CliRunner().invoke(cli, ["-q", "refine", "--cams", str(tmp_path / "seeds"), "--root", str(root), "--split",
                                      "val", "--out", str(out), "--random-walk", str(aff), "--threshold", "fixed",
                                      "--workers", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    covered = {"seed": [], "walked": []}
    leaked = []
    for image_id, mask in masks.items():
        keys, seeds = artifacts.read_cam(artifacts.cam_path(tmp_path / "seeds", image_id))
        walked_keys, walked = artifacts.read_cam(artifacts.cam_path(out / "walked", image_id))
        assert walked_keys.tolist() == keys.tolist()
        assert np.abs(walked - seeds).max() > 0.5, image_id
        for key, seed, spread in zip(keys, seeds, walked):
            covered["seed"].append(seed[mask == key] >= 0.5)
            covered["walked"].append(spread[mask == key] >= 0.5)
            leaked.append(spread[mask == 0] >= 0.5)
    seed_share, walked_share = (float(np.concatenate(values).mean()) for values in covered.values())
    # the seeds cover 0.48 of the objects' pixels, the walk about 0.85
    assert walked_share >= seed_share + 0.2, (seed_share, walked_share)
    # it reaches about 0.04 of the background; over an untrained network's affinities it floods all of it
    assert float(np.concatenate(leaked).mean()) <= 0.15
