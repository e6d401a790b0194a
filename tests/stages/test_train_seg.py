import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import assert_one_line_error
from toy_data import make_toy_dataset, read_masks, trivial_mious
from wsss.stages.cli import cli
from wsss.stages.train_seg import TrainSegConfig, total_iterations
from wsss import artifacts
from wsss.datasets.prepared import SplitSpec, write_prepared
from wsss.device import DistInfo

torch.set_num_threads(1)

CLASSES = ["background", "square", "disc"]
COLOURS = {1: (220, 40, 40), 2: (40, 40, 220)}


def make_dataset(root, sizes=None):
    """Tiny dataset: train 4 images, val 2, each with one coloured square (1) or disc (2)."""
    rng = np.random.default_rng(0)
    sizes = sizes or {"t0": (40, 36), "t1": (36, 40), "t2": (40, 40), "t3": (38, 42), "v0": (37, 41), "v1": (40, 35)}
    labels = {}
    for index, (image_id, (height, width)) in enumerate(sizes.items()):
        image = rng.integers(90, 140, (height, width, 3), dtype=np.uint8)
        mask = np.zeros((height, width), np.uint8)
        cls = 1 + index % 2
        top, left = rng.integers(2, 12, 2)
        if cls == 1:
            mask[top:top + 18, left:left + 18] = 1
        else:
            yy, xx = np.mgrid[:height, :width]
            mask[(yy - top - 10) ** 2 + (xx - left - 10) ** 2 < 81] = 2
        image[mask > 0] = COLOURS[cls]
        mask[top, :] = np.where(mask[top, :] == 0, 0, 255)  # some ignore pixels in the ground truth
        artifacts.write_image(root / "images" / f"{image_id}.png", image)
        artifacts.write_label_png(root / "masks" / f"{image_id}.png", mask)
        labels[image_id] = [cls]
    spec = SplitSpec(image_dir="images", image_ext=".png", mask_dir="masks")
    train = [i for i in sizes if i.startswith("t")]
    val = [i for i in sizes if i.startswith("v")]
    write_prepared(root, "folder", CLASSES, {"train": (spec, train), "val": (spec, val)}, labels)
    return train, val


def write_pseudo(root, folder, ids, reliability=True):
    """Pseudo-labels = ground truth with a border of 255; reliability 0.5 on background, 1.5 on objects."""
    for image_id in ids:
        mask = artifacts.read_label_png(root / "masks" / f"{image_id}.png").copy()
        mask[:2] = 255
        artifacts.write_label_png(artifacts.label_path(folder, image_id), mask)
        if reliability:
            artifacts.write_reliability(artifacts.reliability_path(folder, image_id),
                                        np.where(mask == 0, 0.5, 1.5).astype(np.float32))


BASE = ["--model", "deeplabv3_resnet18", "--weights-backbone", "none", "--crop-size", "32", "--batch-size", "2",
        "--device", "cpu", "--workers", "0", "--lr", "0.01", "--log-every", "1"]


def train(root, out, *extra):
    result = CliRunner().invoke(cli, ["train-seg", "--root", str(root), "--out", str(out), *BASE, *extra])
    return result


@pytest.fixture()
def data(tmp_path):
    root = tmp_path / "data"
    train_ids, val_ids = make_dataset(root)
    return root, train_ids, val_ids


def test_gt_run_writes_checkpoints_and_val_miou(data, tmp_path):
    root, _, val_ids = data
    out = tmp_path / "gt"
    result = train(root, out, "--labels", "gt", "--iterations", "3", "--eval-every", "2")
    assert result.exit_code == 0, result.output
    metrics = json.loads(artifacts.metrics_path(out).read_text())
    assert metrics["labels"] == "gt" and metrics["finished"] and metrics["iteration"] == 3
    assert 0.0 <= metrics["val_miou"] <= 1.0
    assert [h["step"] for h in metrics["history"] if "val_miou" in h] == [2, 3]
    assert len([h for h in metrics["history"] if "loss" in h]) == 3
    assert f"val mIoU {metrics['val_miou']:.4f}" in result.output
    checkpoint = artifacts.load_checkpoint(artifacts.checkpoint_path(out, "last"))
    assert checkpoint["arch"] == {"model": "deeplabv3_resnet18", "num_classes": 3, "output_stride": 16}
    assert checkpoint["classes"] == CLASSES and checkpoint["step"] == 3
    assert checkpoint["config"]["labels"] == "gt" and isinstance(checkpoint["config"], dict)
    assert {"optimizer", "scheduler"} <= set(checkpoint)
    assert metrics["best_val_miou"] == max(h["val_miou"] for h in metrics["history"] if "val_miou" in h)
    # best.pth is the last checkpoint unless --select val-miou asks for the val masks to choose it
    best = artifacts.load_checkpoint(artifacts.checkpoint_path(out, "best"))
    assert best["step"] == 3 and metrics["selected"]["metric"] is None
    config = json.loads(artifacts.config_path(out).read_text())
    assert config["config"]["model"] == "deeplabv3_resnet18" and config["total_iterations"] == 3

    # the reported val mIoU is the final model's: recompute it from last.pth
    from wsss.segmentation import evaluate_model
    from wsss.datasets.prepared import PreparedDataset
    from wsss.models.deeplab import model_from_checkpoint

    model = model_from_checkpoint(checkpoint)
    matrix = evaluate_model(model, PreparedDataset.load(root), "val", torch.device("cpu"), DistInfo())
    assert matrix.miou() == pytest.approx(metrics["val_miou"], abs=1e-9)


def test_pseudo_labels_with_raw_and_weak_full_ratio(data, tmp_path):
    root, train_ids, _ = data
    pseudo = tmp_path / "pseudo"
    write_pseudo(root, pseudo, train_ids)
    out = tmp_path / "raw"
    command = ["--labels", str(pseudo), "--raw", "--iterations", "2", "--upper-bound", str(tmp_path / "gt")]
    result = train(root, out, *command)  # the gt run does not exist yet: no ratio, no failure
    assert result.exit_code == 0, result.output
    assert json.loads(artifacts.metrics_path(out).read_text())["weak_full_ratio"] is None
    assert train(root, tmp_path / "gt", "--labels", "gt", "--iterations", "2").exit_code == 0
    result = train(root, out, *command)  # finished run: only the ratio is filled in
    assert result.exit_code == 0, result.output
    metrics = json.loads(artifacts.metrics_path(out).read_text())
    full = json.loads(artifacts.metrics_path(tmp_path / "gt").read_text())["val_miou"]
    assert metrics["raw"] is True and metrics["labels"] == str(pseudo)
    assert metrics["upper_bound"]["val_miou"] == full
    assert metrics["weak_full_ratio"] == pytest.approx(metrics["val_miou"] / full)
    assert "weak/full" in result.output
    result = train(root, tmp_path / "other", "--labels", "gt", "--iterations", "1", "--upper-bound", str(out))
    assert result.exit_code == 1 and "must be a `train-seg --labels gt` run" in result.output
    assert not (tmp_path / "other").exists()


def test_raw_weights_each_pixel_by_its_reliability(data, tmp_path):
    """Reliability 2 on every pixel doubles the first step's loss: RAW divides the weighted sum by the number
    of labelled pixels, not by the weights' sum (which would leave it unchanged), and without --raw the maps
    are not read."""
    root, train_ids, _ = data
    pseudo = tmp_path / "pseudo"
    write_pseudo(root, pseudo, train_ids, reliability=False)
    for image_id in train_ids:
        shape = artifacts.read_label_png(artifacts.label_path(pseudo, image_id)).shape
        artifacts.write_reliability(artifacts.reliability_path(pseudo, image_id), np.full(shape, 2.0, np.float32))
    first_loss = {}
    for name, extra in (("raw", ["--raw"]), ("plain", [])):
        result = train(root, tmp_path / name, "--labels", str(pseudo), "--iterations", "2", *extra)
        assert result.exit_code == 0, result.output
        first_loss[name] = json.loads(artifacts.metrics_path(tmp_path / name).read_text())["history"][0]["loss"]
    assert first_loss["raw"] == pytest.approx(2 * first_loss["plain"], rel=1e-4)


def test_resume_continues_the_schedule(data, tmp_path):
    root, _, _ = data
    common = ["--labels", "gt", "--iterations", "4", "--eval-every", "0", "--val-split", "none"]
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    assert train(root, interrupted, *common, "--stop-after", "2").exit_code == 0
    half = artifacts.load_checkpoint(artifacts.checkpoint_path(interrupted, "last"))
    assert half["step"] == 2
    assert json.loads(artifacts.metrics_path(interrupted).read_text())["finished"] is False
    result = train(root, interrupted, *common)  # --resume is the default
    assert result.exit_code == 0, result.output
    assert train(root, straight, *common).exit_code == 0
    resumed = artifacts.load_checkpoint(artifacts.checkpoint_path(interrupted, "last"))
    direct = artifacts.load_checkpoint(artifacts.checkpoint_path(straight, "last"))
    assert resumed["step"] == direct["step"] == 4
    assert resumed["scheduler"]["last_epoch"] == direct["scheduler"]["last_epoch"] == 4
    for name, tensor in direct["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    assert any(not torch.equal(half["model"][name], tensor) for name, tensor in direct["model"].items())
    # losses recorded before and after the interruption match the straight run
    losses = lambda out: [h["loss"] for h in json.loads(artifacts.metrics_path(out).read_text())["history"]]
    assert losses(interrupted) == losses(straight)


def test_label_folder_and_unit_reliability_reproduce_the_gt_run(data, tmp_path):
    root, train_ids, _ = data
    copied = tmp_path / "copied"
    for image_id in train_ids:  # "pseudo-labels" that are the ground truth, with reliability 1 everywhere
        mask = artifacts.read_label_png(root / "masks" / f"{image_id}.png")
        artifacts.write_label_png(artifacts.label_path(copied, image_id), mask)
        artifacts.write_reliability(artifacts.reliability_path(copied, image_id), np.ones(mask.shape, np.float32))
    common = ["--iterations", "2", "--val-split", "none"]
    assert train(root, tmp_path / "gt", "--labels", "gt", *common).exit_code == 0
    assert train(root, tmp_path / "dir", "--labels", str(copied), *common).exit_code == 0
    assert train(root, tmp_path / "raw", "--labels", str(copied), "--raw", *common).exit_code == 0
    weights = {name: artifacts.load_checkpoint(artifacts.checkpoint_path(tmp_path / name, "last"))["model"]
               for name in ("gt", "dir", "raw")}
    for key, tensor in weights["gt"].items():
        assert torch.equal(weights["dir"][key], tensor), key
        assert torch.equal(weights["raw"][key], tensor), key


def test_resume_refuses_a_changed_schedule(data, tmp_path):
    root, _, _ = data
    out = tmp_path / "run"
    common = ["--labels", "gt", "--iterations", "4", "--val-split", "none"]
    assert train(root, out, *common, "--stop-after", "1").exit_code == 0
    result = train(root, out, "--labels", "gt", "--iterations", "6", "--val-split", "none")
    assert result.exit_code == 1 and "cannot resume" in result.output and "--overwrite" in result.output
    assert train(root, out, *common, "--lr", "0.5").exit_code == 1
    result = train(root, out, "--labels", "gt", "--iterations", "6", "--val-split", "none", "--overwrite")
    assert result.exit_code == 0
    assert artifacts.load_checkpoint(artifacts.checkpoint_path(out, "last"))["step"] == 6


def test_output_stride_8_is_stored_resumed_and_checked(data, tmp_path):
    root, _, _ = data
    out = tmp_path / "dense"
    common = ["--labels", "gt", "--iterations", "2", "--val-split", "none", "--output-stride", "8"]
    assert train(root, out, *common, "--stop-after", "1").exit_code == 0
    # the stride is part of the schedule: a run at another stride does not resume this one
    result = train(root, out, "--labels", "gt", "--iterations", "2", "--val-split", "none")
    assert result.exit_code == 1 and "--output-stride" in result.output
    assert train(root, out, *common).exit_code == 0
    checkpoint = artifacts.load_checkpoint(artifacts.checkpoint_path(out, "last"))
    assert checkpoint["arch"]["output_stride"] == 8 and checkpoint["step"] == 2
    from wsss.models.deeplab import model_from_checkpoint
    with torch.no_grad():
        model = model_from_checkpoint(checkpoint).eval()
        assert model.backbone(torch.zeros(1, 3, 32, 32)).shape[-2:] == (4, 4)
    result = train(root, tmp_path / "r50", "--labels", "gt", "--iterations", "1", "--model", "deeplabv3_resnet50",
                   "--output-stride", "16")
    assert_one_line_error(result, "'--output-stride': 16: deeplabv3_resnet50 is built with output stride 8")
    assert result.exit_code == 2 and not (tmp_path / "r50").exists()


def test_missing_pseudo_label_is_a_one_line_error(data, tmp_path):
    root, train_ids, _ = data
    pseudo = tmp_path / "pseudo"
    write_pseudo(root, pseudo, train_ids[:-1])
    out = tmp_path / "run"
    result = train(root, out, "--labels", str(pseudo), "--iterations", "1")
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and f"{train_ids[-1]}.png" in result.output
    assert "Traceback" not in result.output and not out.exists()
    result = train(root, out, "--labels", "gt", "--raw", "--iterations", "1")
    assert result.exit_code == 2 and "--raw needs --labels DIR" in result.output


def test_total_iterations_from_epochs():
    cfg = TrainSegConfig(root=".", out_dir=".", labels="gt", epochs=2.0, batch_size=4)
    assert total_iterations(cfg, num_images=10, world_size=1) == 5  # ceil(2 * 10 / 4)
    assert total_iterations(cfg, num_images=10, world_size=2) == 3  # ceil(2 * 5 / 4)
    # a config.json of an --epochs run written before the iterations default had one owner
    assert total_iterations(cfg.replace(iterations=None), num_images=10, world_size=1) == 5
    assert total_iterations(TrainSegConfig(root=".", out_dir=".", labels="gt"), 10, 1) == 20000


def test_option_rules_are_usage_errors_before_any_work(data, tmp_path):
    root, _, _ = data
    out = tmp_path / "run"
    result = train(root, out, "--labels", "gt", "--iterations", "5", "--epochs", "2")
    assert_one_line_error(result, "'--epochs'", "either --iterations or --epochs")
    assert result.exit_code == 2
    result = train(root, out, "--labels", str(tmp_path), "--raw", "--reliability", str(tmp_path))
    assert_one_line_error(result, "'--raw'", "not both")
    result = train(root, out, "--labels", "gt", "--select", "val-miou", "--val-split", "none")
    assert_one_line_error(result, "'--select'", "--val-split")
    result = train(root, out, "--labels", "gt", "--upper-bound", str(tmp_path), "--val-split", "none")
    assert_one_line_error(result, "'--upper-bound'", "--val-split")
    assert not out.exists()
    # --weights is train-cls's name of --weights-backbone, and accepted here too
    assert train(root, out, "--labels", "gt", "--iterations", "1", "--val-split", "none", "--weights", "none",
                 "--stop-after", "1").exit_code == 0


def test_checkpoints_every_eval_every_also_without_a_val_split(data, tmp_path, monkeypatch):
    import wsss.segmentation

    root, _, _ = data
    out = tmp_path / "run"
    real_loss, calls = wsss.segmentation.segmentation_loss, []

    def killed_at_the_third_step(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands in for a kill -9 during iteration 3
        return real_loss(*args)

    monkeypatch.setattr(wsss.segmentation, "segmentation_loss", killed_at_the_third_step)
    result = train(root, out, "--labels", "gt", "--iterations", "4", "--eval-every", "2", "--val-split", "none")
    assert result.exit_code != 0
    # the work of the first two iterations is kept (before, a run without a val split checkpointed only at the end)
    assert artifacts.load_checkpoint(artifacts.checkpoint_path(out, "last"))["step"] == 2
    monkeypatch.setattr(wsss.segmentation, "segmentation_loss", real_loss)
    assert train(root, out, "--labels", "gt", "--iterations", "4", "--eval-every", "2",
                 "--val-split", "none").exit_code == 0
    assert artifacts.load_checkpoint(artifacts.checkpoint_path(out, "last"))["step"] == 4


def test_history_after_a_stop_inside_a_round_is_that_of_a_straight_run(data, tmp_path):
    root, _, _ = data
    common = ["--labels", "gt", "--iterations", "6", "--eval-every", "3", "--log-every", "5", "--val-split", "none"]
    assert train(root, tmp_path / "straight", *common).exit_code == 0
    assert train(root, tmp_path / "stopped", *common, "--stop-after", "2").exit_code == 0
    assert train(root, tmp_path / "stopped", *common).exit_code == 0
    history = {name: json.loads(artifacts.metrics_path(tmp_path / name).read_text())["history"]
               for name in ("straight", "stopped")}
    assert [(record.get("round"), record["step"]) for record in history["straight"]] == [(1, 3), (None, 5), (2, 6)]
    # before, the stop added a round record at step 2 and the round record at 3 held only step 3's loss
    assert history["stopped"] == history["straight"]


def test_pseudo_label_outside_the_class_list_is_one_line_naming_the_png(data, tmp_path):
    root, train_ids, _ = data
    pseudo = tmp_path / "pseudo"
    write_pseudo(root, pseudo, train_ids, reliability=False)
    label = artifacts.read_label_png(artifacts.label_path(pseudo, train_ids[1])).copy()
    label[5:, :] = 50  # everywhere below the top rows, so every crop holds it
    artifacts.write_label_png(artifacts.label_path(pseudo, train_ids[1]), label)
    at = BASE.index("--workers")
    args = ["train-seg", "--root", str(root), "--out", str(tmp_path / "run"), "--labels", str(pseudo),
            *BASE[:at], *BASE[at + 2:], "--workers", "2", "--iterations", "2", "--val-split", "none"]
    # in a DataLoader worker (the default): before, torch's IndexError "Target 50 is out of bounds" deep in the loss
    result = CliRunner().invoke(cli, args)
    assert_one_line_error(result, f"{train_ids[1]}.png: label map holds class index 50",
                          "the dataset's classes are 0..2")
    assert not artifacts.checkpoint_path(tmp_path / "run", "last").exists()


def test_learns_the_toy_data_from_ground_truth(tmp_path):
    """30 steps on red squares and blue discs: val mIoU well above the labellings that need no learning."""
    splits = make_toy_dataset(tmp_path / "toy", num_train=24, num_val=12, size=64)
    out = tmp_path / "seg"
    result = CliRunner().invoke(cli, [
        "train-seg", "--root", str(tmp_path / "toy"), "--out", str(out), "--labels", "gt", "--model",
        "deeplabv3_resnet18", "--weights-backbone", "none", "--crop-size", "64", "--scale-range", "0.8,1.2",
        "--batch-size", "8", "--iterations", "30", "--eval-every", "0", "--log-every", "10", "--lr", "0.01",
        "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(artifacts.metrics_path(out).read_text())
    losses = [record["loss"] for record in metrics["history"]]
    assert losses[-1] < losses[0] / 2, losses
    # all background (what an untrained network predicts here) scores about 0.28 on these masks, every pixel of
    # an image its class about 0.08; a network that segments beats both by a fifth of the IoU scale
    floor = max(trivial_mious(read_masks(tmp_path / "toy", splits["val"])).values())
    assert metrics["val_miou"] >= floor + 0.2, (metrics["val_miou"], floor)
