import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from wsss.stages.cli import cli
from wsss import artifacts
from wsss.cam import ERASE_THRESH, erasing_cam, max_normalize, multiscale_cam
from wsss.datasets.prepared import PreparedDataset, SplitSpec, write_prepared
from wsss.models.classifier import CamNet
from wsss.stages.make_cam import MakeCamConfig
from wsss.transforms import normalize_image


CLASSES = ["background", "square", "disc", "ring"]
SIZES = {"a": (61, 47), "b": (40, 36), "c": (40, 36), "d": (33, 50)}
LABELS = {"a": [1, 3], "b": [2], "c": [1, 2], "d": [3]}


def make_dataset(root):
    rng = np.random.default_rng(0)
    for image_id, (height, width) in SIZES.items():
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        mask = np.zeros((height, width), np.uint8)
        for cls in LABELS[image_id]:
            mask[4 * cls:4 * cls + 8, 2:20] = cls
            image[mask == cls] = (60 * cls, 200, 255 - 60 * cls)
        artifacts.write_image(root / "images" / f"{image_id}.png", image)
        artifacts.write_label_png(root / "masks" / f"{image_id}.png", mask)
    spec = SplitSpec(image_dir="images", image_ext=".png", mask_dir="masks")
    write_prepared(root, "folder", CLASSES, {"train": (spec, list(SIZES))}, LABELS)


@pytest.fixture()
def setup(tmp_path):
    root = tmp_path / "data"
    make_dataset(root)
    torch.manual_seed(0)
    net = CamNet("resnet18", num_classes=len(CLASSES)).eval()
    checkpoint = tmp_path / "cls" / "best.pth"
    artifacts.save_checkpoint(checkpoint, {"model": net.state_dict(), "config": {}, "classes": CLASSES,
                                           "arch": net.arch, "epoch": 1})
    return root, checkpoint, net


def make_cam(root, checkpoint, out, *extra):
    return CliRunner().invoke(cli, ["make-cam", "--root", str(root), "--checkpoint", str(checkpoint), "--out", str(out),
                                    "--device", "cpu", "--workers", "0", *extra])


def test_gt_cams_at_full_resolution_match_the_library(setup, tmp_path):
    root, checkpoint, net = setup
    out = tmp_path / "cams"
    # a folder means its best.pth; the default is the plain CAM (inference-time erasing is tested below)
    result = make_cam(root, checkpoint.parent, out, "--scales", "1.0,0.5")
    assert result.exit_code == 0, result.output
    dataset = PreparedDataset.load(root)
    for image_id, (height, width) in SIZES.items():
        keys, cams = artifacts.read_cam(artifacts.cam_path(out, image_id))
        assert keys.tolist() == LABELS[image_id]
        assert cams.shape == (len(LABELS[image_id]), height, width)
        assert cams.min() >= 0 and np.allclose(cams.max(axis=(1, 2)), 1.0, atol=1e-3)
    image = normalize_image(dataset.read_image("train", "a"))[None]
    expected, _ = multiscale_cam(net, image, [[0, 2]], scales=(1.0, 0.5))
    _, cams = artifacts.read_cam(artifacts.cam_path(out, "a"))
    np.testing.assert_allclose(cams, max_normalize(expected[0]).numpy(), atol=2e-3)  # float16 on disk
    metrics = json.loads(artifacts.metrics_path(out).read_text())
    assert metrics["processed"] == 4 and metrics["skipped"] == 0 and metrics["images_per_second"] > 0
    config = json.loads(artifacts.config_path(out).read_text())
    assert config["config"]["scales"] == [1.0, 0.5] and config["checkpoint_file"].endswith("best.pth")
    assert config["config"]["erase_steps"] == 0


def test_finished_images_are_skipped_unless_overwrite(setup, tmp_path):
    root, checkpoint, _ = setup
    out = tmp_path / "cams"
    assert make_cam(root, checkpoint, out, "--scales", "1.0").exit_code == 0
    first = artifacts.cam_path(out, "b")
    os.utime(first, (1, 1))
    (out / "c.npz").write_bytes(b"truncated")  # a broken file is redone
    result = make_cam(root, checkpoint, out, "--scales", "1.0")
    assert result.exit_code == 0, result.output
    metrics = json.loads(artifacts.metrics_path(out).read_text())
    assert metrics["processed"] == 1 and metrics["skipped"] == 3
    assert first.stat().st_mtime == 1 and artifacts.cam_is_complete(out / "c.npz")
    assert make_cam(root, checkpoint, out, "--scales", "1.0", "--overwrite").exit_code == 0
    assert first.stat().st_mtime > 1


def test_batching_equal_sizes_gives_the_same_cams(setup, tmp_path):
    root, checkpoint, _ = setup
    assert make_cam(root, checkpoint, tmp_path / "one", "--scales", "1.0,1.5").exit_code == 0
    assert make_cam(root, checkpoint, tmp_path / "two", "--scales", "1.0,1.5", "--batch-size", "3").exit_code == 0
    for image_id in SIZES:  # b and c share a size and run as one batch
        _, single = artifacts.read_cam(artifacts.cam_path(tmp_path / "one", image_id))
        _, batched = artifacts.read_cam(artifacts.cam_path(tmp_path / "two", image_id))
        np.testing.assert_allclose(single, batched, atol=2e-3)


def test_predicted_classes_follow_the_score_threshold(setup, tmp_path):
    root, checkpoint, net = setup
    dataset = PreparedDataset.load(root)
    image = normalize_image(dataset.read_image("train", "a"))[None]
    with torch.inference_mode():
        _, logits = multiscale_cam(net, image, None, scales=(1.0,))
    scores = torch.sigmoid(logits[0])
    threshold = float(scores.sort().values[1])  # between the lowest and the middle score: keep 2 of 3
    result = make_cam(root, checkpoint, tmp_path / "pred", "--scales", "1.0", "--classes", "pred",
                      "--score-thresh", f"{threshold - 1e-6:.8f}", "--limit", "1")
    assert result.exit_code == 0, result.output
    keys, cams = artifacts.read_cam(artifacts.cam_path(tmp_path / "pred", "a"))
    assert keys.tolist() == (torch.nonzero(scores >= threshold - 1e-6).flatten() + 1).tolist()
    assert len(keys) == 2 and cams.shape == (2, 61, 47)
    assert not artifacts.cam_path(tmp_path / "pred", "b").exists()  # --limit 1


def test_inference_erasing_changes_the_cams_and_matches_the_library(setup, tmp_path):
    root, checkpoint, net = setup
    out = tmp_path / "erase"
    result = make_cam(root, checkpoint, out, "--scales", "1.0", "--no-flip", "--erase-steps", "2",
                      "--erase-thresh", "0.6")
    assert result.exit_code == 0, result.output
    dataset = PreparedDataset.load(root)
    image = normalize_image(dataset.read_image("train", "a"))
    expected = erasing_cam(net, image, [0, 2], erase_steps=2, erase_thresh=0.6, scales=(1.0,), flip=False)
    plain = erasing_cam(net, image, [0, 2], erase_steps=0, scales=(1.0,), flip=False)
    _, cams = artifacts.read_cam(artifacts.cam_path(out, "a"))
    np.testing.assert_allclose(cams, expected.numpy(), atol=2e-3)
    assert np.abs(cams - plain.numpy()).max() > 0.01
    # --erase-stop 1: no score reaches 1, so every class stops at once and keeps its plain CAM
    never = tmp_path / "never"
    result = make_cam(root, checkpoint, never, "--scales", "1.0", "--no-flip", "--erase-steps", "2",
                      "--erase-thresh", "0.6", "--erase-stop", "1")
    assert result.exit_code == 0, result.output
    _, cams = artifacts.read_cam(artifacts.cam_path(never, "a"))
    np.testing.assert_allclose(cams, plain.numpy(), atol=2e-3)
    metrics = json.loads((never / "metrics.json").read_text())
    assert metrics["erase_stop"] == 1.0
    # step 1 erased the 6 (image, class) pairs of the 4 images; all stopped, so step 2 erased none
    assert [step["pairs"] for step in metrics["erasing"]] == [6, 0]
    assert 0 <= metrics["erasing"][0]["recognised"] <= 1 and metrics["erasing"][1]["recognised"] is None


def _miou_by_definition(root, cam_dir, threshold: float) -> float:
    """The CAMs' mIoU at a background threshold, from the mask and CAM files alone: a pixel is the class of its
    strongest CAM where that exceeds the threshold, else background; IoU = |label & mask| / |label | mask| per
    class, averaged over the classes in either."""
    from PIL import Image

    intersection, union = np.zeros(len(CLASSES)), np.zeros(len(CLASSES))
    for image_id in SIZES:
        mask = np.array(Image.open(root / "masks" / f"{image_id}.png"))
        with np.load(artifacts.cam_path(cam_dir, image_id)) as data:
            keys, cams = data["keys"].astype(np.int64), data["cams"].astype(np.float32)
        label = np.where(cams.max(0) > threshold, keys[cams.argmax(0)], 0)
        for cls in range(len(CLASSES)):
            intersection[cls] += np.sum((label == cls) & (mask == cls))
            union[cls] += np.sum((label == cls) | (mask == cls))
    return float(np.mean(intersection[union > 0] / union[union > 0]))


def test_eval_runs_the_threshold_sweep(setup, tmp_path):
    root, checkpoint, _ = setup
    out = tmp_path / "cams"
    result = make_cam(root, checkpoint, out, "--scales", "1.0", "--eval", "--sweep", "0.1:0.5:0.1")
    assert result.exit_code == 0, result.output
    metrics = json.loads(artifacts.metrics_path(out).read_text())
    sweep = metrics["eval"]["sweep"]
    assert [entry["threshold"] for entry in sweep] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    expected = [_miou_by_definition(root, out, threshold) for threshold in (0.1, 0.2, 0.3, 0.4, 0.5)]
    assert [entry["miou"] for entry in sweep] == pytest.approx(expected, abs=1e-6)
    assert len(set(np.round(expected, 6))) == len(expected)  # the thresholds give different labels
    assert metrics["eval"]["miou"] == pytest.approx(max(expected), abs=1e-6)
    assert metrics["eval"]["best_threshold"] == pytest.approx(0.1 * (1 + int(np.argmax(expected))))
    assert "best threshold" in result.output
    assert os.path.isfile(metrics["eval"]["report_file"])


def test_bad_inputs_are_one_line_errors(setup, tmp_path):
    root, checkpoint, net = setup
    result = make_cam(root, tmp_path / "missing.pth", tmp_path / "cams")
    assert result.exit_code == 1 and "missing.pth: checkpoint not found" in result.output
    other = tmp_path / "other.pth"
    artifacts.save_checkpoint(other, {"model": net.state_dict(), "config": {}, "classes": ["background", "x", "y", "z"],
                                      "arch": net.arch})
    result = make_cam(root, other, tmp_path / "cams")
    assert result.exit_code == 1 and "other.pth: the classifier was trained on classes" in result.output
    assert "Traceback" not in result.output


def test_two_shards_write_the_files_of_one_unsharded_run(setup, tmp_path):
    root, checkpoint, _ = setup
    assert make_cam(root, checkpoint, tmp_path / "whole", "--scales", "1.0").exit_code == 0
    for index in (0, 1):
        result = make_cam(root, checkpoint, tmp_path / "sharded", "--scales", "1.0", "--shard", f"{index}/2")
        assert result.exit_code == 0, result.output
        # each shard keeps its own provenance next to the CAMs
        shard_metrics = json.loads(artifacts.metrics_path(tmp_path / "sharded", (index, 2)).read_text())
        assert shard_metrics["processed"] == 2
    for image_id in SIZES:
        assert (artifacts.cam_path(tmp_path / "sharded", image_id).read_bytes()
                == artifacts.cam_path(tmp_path / "whole", image_id).read_bytes()), image_id
    result = make_cam(root, checkpoint, tmp_path / "x", "--shard", "2/2")
    assert result.exit_code == 2 and "--shard" in result.output
    result = make_cam(root, checkpoint, tmp_path / "x", "--shard", "0/2", "--eval")
    assert result.exit_code == 2 and "Invalid value for '--eval'" in result.output and "every --shard" in result.output
    assert not (tmp_path / "x").exists()


def test_config_owns_its_defaults_and_checks(tmp_path):
    cfg = MakeCamConfig(root=tmp_path, checkpoint=tmp_path / "best.pth", out_dir=tmp_path / "cams")
    assert cfg.erase_thresh == ERASE_THRESH and cfg.erase_steps == 0 and cfg.classes == "gt"
    # what the command line's parsers refuse is refused when the config comes from Python or a file, too
    for changes, option in (({"scales": ()}, "--scales"), ({"sweep": (0.5, 0.1, 0.1)}, "--sweep"),
                            ({"shard": (2, 2)}, "--shard"), ({"erase_thresh": 0.0}, "--erase-thresh"),
                            ({"classes": "all"}, "--classes"), ({"score_thresh": float("nan")}, "--score-thresh")):
        with pytest.raises(ValueError, match=f"^{option} "):
            cfg.replace(**changes)


def test_bf16_autocast_on_cpu_stays_close_to_float32(setup, tmp_path):
    root, checkpoint, _ = setup
    # the network's precision alone: erasing thresholds the CAMs, and a pixel at the threshold may flip
    plain = ("--scales", "1.0,0.5", "--erase-steps", "0")
    assert make_cam(root, checkpoint, tmp_path / "fp32", *plain, "--amp", "off").exit_code == 0
    result = make_cam(root, checkpoint, tmp_path / "bf16", *plain, "--amp", "bf16")
    assert result.exit_code == 0, result.output
    assert json.loads(artifacts.metrics_path(tmp_path / "bf16").read_text())["precision"] == "bf16"
    worst = 0.0
    for image_id in SIZES:
        _, full = artifacts.read_cam(artifacts.cam_path(tmp_path / "fp32", image_id))
        _, half = artifacts.read_cam(artifacts.cam_path(tmp_path / "bf16", image_id))
        worst = max(worst, float(np.abs(full - half).max()))
    # bfloat16 keeps 8 bits of mantissa: max-normalised CAMs move by a few hundredths at most
    assert 0 < worst < 0.05
