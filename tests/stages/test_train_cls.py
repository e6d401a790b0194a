import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from toy_data import make_toy_dataset, read_masks, trivial_mious
from wsss.stages.cli import cli
from wsss import artifacts
from wsss.datasets.prepared import SplitSpec, write_prepared


CLASSES = ["background", "square", "disc"]
COLOURS = {1: (220, 40, 40), 2: (40, 40, 220)}


def make_dataset(root, val_masks=True):
    """4 train and 2 val images (odd sizes), each with a red square (1), a blue disc (2) or both."""
    rng = np.random.default_rng(0)
    sizes = {"t0": (40, 36), "t1": (36, 40), "t2": (40, 40), "t3": (38, 42), "v0": (37, 41), "v1": (40, 35)}
    present = {"t0": [1], "t1": [2], "t2": [1, 2], "t3": [2], "v0": [1, 2], "v1": [1]}
    for image_id, (height, width) in sizes.items():
        image = rng.integers(90, 140, (height, width, 3), dtype=np.uint8)
        mask = np.zeros((height, width), np.uint8)
        if 1 in present[image_id]:
            mask[2:16, 2:16] = 1
        if 2 in present[image_id]:
            yy, xx = np.mgrid[:height, :width]
            mask[(yy - 26) ** 2 + (xx - 24) ** 2 < 49] = 2
        for cls, colour in COLOURS.items():
            image[mask == cls] = colour
        artifacts.write_image(root / "images" / f"{image_id}.png", image)
        artifacts.write_label_png(root / "masks" / f"{image_id}.png", mask)
    train_spec = SplitSpec(image_dir="images", image_ext=".png", mask_dir="masks")
    val_spec = SplitSpec(image_dir="images", image_ext=".png", mask_dir="masks" if val_masks else None)
    write_prepared(root, "folder", CLASSES, {"train": (train_spec, ["t0", "t1", "t2", "t3"]),
                                             "val": (val_spec, ["v0", "v1"])}, present)


BASE = ["--backbone", "resnet18", "--weights", "none", "--crop-size", "32", "--batch-size", "2", "--device", "cpu",
        "--workers", "0", "--lr", "0.01", "--seed", "3"]


def train(root, out, *extra):
    return CliRunner().invoke(cli, ["train-cls", "--root", str(root), "--out", str(out), *BASE, *extra])


@pytest.fixture()
def root(tmp_path):
    make_dataset(tmp_path / "data")
    return tmp_path / "data"


def weights(out, which="last"):
    return artifacts.load_checkpoint(artifacts.checkpoint_path(out, which))["model"]


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


# --------------------------------------------------------------------------- the stage


def test_one_epoch_writes_checkpoints_config_and_metrics(root, tmp_path):
    out = tmp_path / "cls"
    # 64 px crops: a 0.5-0.75 view has 2x2 to 3x3 cells (at 32 px a one-cell view min-max normalises to 0)
    result = train(root, out, "--epochs", "1", "--er-weight", "1", "--erase-weight", "0.5", "--er-scale-range",
                   "0.5,0.75", "--crop-size", "64")
    assert result.exit_code == 0, result.output
    for which in ("last", "best"):
        checkpoint = artifacts.load_checkpoint(artifacts.checkpoint_path(out, which))  # weights_only=True
        assert checkpoint["arch"] == {"backbone": "resnet18", "num_classes": 3, "output_stride": 16}
        assert checkpoint["classes"] == CLASSES
        assert checkpoint["round"] == 1 and checkpoint["step"] == 2  # 4 images, batch 2
        assert checkpoint["config"]["er_weight"] == 1.0 and checkpoint["config"]["erase_weight"] == 0.5
        assert {"optimizer", "scheduler"} <= set(checkpoint)
        assert checkpoint["model"]["classifier.weight"].shape == (2, 512, 1, 1)
    config = json.loads(artifacts.config_path(out).read_text())
    assert config["config"]["backbone"] == "resnet18" and config["arch"]["num_classes"] == 3
    metrics = json.loads(artifacts.metrics_path(out).read_text())
    assert metrics["finished"] and metrics["epoch"] == 1 and len(metrics["history"]) == 1
    record = metrics["history"][0]
    assert record["loss_er"] > 0 and record["loss_erase"] > 0 and record["loss_cls"] > 0
    assert record["loss"] == pytest.approx(record["loss_cls"] + record["loss_er"] + 0.5 * record["loss_erase"],
                                           rel=1e-4)
    assert 0 <= record["val_map"] <= 1 and 0 <= record["val_cam_miou"] <= 1
    assert set(record["val_ap"]) == {"square", "disc"}
    # best.pth is picked by val mAP (image-level labels), never by the val masks unless asked
    assert metrics["best"] == {"round": 1, "step": 2, "metric": "val_map", "value": record["val_map"]}


def test_same_seed_same_weights(root, tmp_path):
    assert train(root, tmp_path / "a", "--epochs", "1", "--er-weight", "1").exit_code == 0
    assert train(root, tmp_path / "b", "--epochs", "1", "--er-weight", "1").exit_code == 0
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    # and a different seed really changes them
    result = CliRunner().invoke(cli, ["train-cls", "--root", str(root), "--out", str(tmp_path / "c"), *BASE[:-2],
                                      "--seed", "4", "--epochs", "1", "--er-weight", "1"])
    assert result.exit_code == 0, result.output
    assert not torch.equal(weights(tmp_path / "a")["classifier.weight"], weights(tmp_path / "c")["classifier.weight"])


def test_resume_continues_the_schedule(root, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ["--epochs", "2", "--erase-weight", "1", "--er-weight", "0.5"]
    assert train(root, straight, *extra).exit_code == 0
    result = train(root, resumed, *extra, "--stop-after", "1")
    assert result.exit_code == 0, result.output
    halfway = artifacts.load_checkpoint(artifacts.checkpoint_path(resumed, "last"))
    assert halfway["round"] == 1 and halfway["step"] == 2
    assert halfway["scheduler"]["last_epoch"] == 2
    assert not json.loads(artifacts.metrics_path(resumed).read_text())["finished"]
    result = train(root, resumed, *extra, "--resume")
    assert result.exit_code == 0, result.output
    final = artifacts.load_checkpoint(artifacts.checkpoint_path(resumed, "last"))
    assert final["round"] == 2 and final["step"] == 4 and final["scheduler"]["last_epoch"] == 4
    # poly schedule over 4 steps: the learning rate after the last step is 0
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0)
    assert_same_weights(final["model"], weights(straight))
    metrics = json.loads(artifacts.metrics_path(resumed).read_text())
    assert metrics["finished"] and [r["round"] for r in metrics["history"]] == [1, 2]


def test_finished_run_is_not_trained_again_and_changed_schedule_refuses(root, tmp_path):
    out = tmp_path / "cls"
    assert train(root, out, "--epochs", "1").exit_code == 0
    # the command's defaults are the plain classifier (bench/ablation.md: equivariance and erasing do not
    # raise DeepLab), so the loss is the classification loss alone
    assert json.loads(artifacts.config_path(out).read_text())["config"]["er_weight"] == 0.0
    record = json.loads(artifacts.metrics_path(out).read_text())["history"][0]
    assert record["loss"] == pytest.approx(record["loss_cls"], rel=1e-6)
    before = weights(out)
    result = train(root, out, "--epochs", "1")
    assert result.exit_code == 0 and "trained 1/1 epochs" in result.output
    assert_same_weights(before, weights(out))
    # --lse-r does not shape a mean-pooled run: the finished run is found, not refused
    result = train(root, out, "--epochs", "1", "--lse-r", "2")
    assert result.exit_code == 0 and "trained 1/1 epochs" in result.output
    assert_same_weights(before, weights(out))
    result = train(root, out, "--epochs", "1", "--er-weight", "1")
    assert result.exit_code == 1
    assert "last.pth: cannot resume, the run used different --er-weight" in result.output
    assert "Traceback" not in result.output
    assert train(root, out, "--epochs", "1", "--er-weight", "1", "--overwrite").exit_code == 0


def test_without_val_masks_best_is_chosen_by_map(tmp_path):
    make_dataset(tmp_path / "data", val_masks=False)
    out = tmp_path / "cls"
    result = train(tmp_path / "data", out, "--epochs", "1")
    assert result.exit_code == 0, result.output
    metrics = json.loads(artifacts.metrics_path(out).read_text())
    assert metrics["history"][0]["val_cam_miou"] is None
    assert metrics["best"]["metric"] == "val_map"


def test_bad_input_is_a_one_line_error(tmp_path, root):
    result = train(tmp_path / "nowhere", tmp_path / "cls", "--epochs", "1")
    assert result.exit_code == 1 and "Error:" in result.output and "nowhere" in result.output
    result = train(root, tmp_path / "cls", "--epochs", "1", "--weights", str(tmp_path / "missing.pth"))
    assert result.exit_code == 1 and "missing.pth: file not found" in result.output
    assert "Traceback" not in result.output


def test_output_stride_8_is_stored_and_used_by_make_cam(root, tmp_path):
    out = tmp_path / "cls"
    result = train(root, out, "--epochs", "1", "--output-stride", "8", "--er-weight", "1", "--crop-size", "40")
    assert result.exit_code == 0, result.output
    checkpoint = artifacts.load_checkpoint(artifacts.checkpoint_path(out, "last"))
    assert checkpoint["arch"]["output_stride"] == 8
    from wsss.models.classifier import load_classifier

    model = load_classifier(checkpoint)
    # 40 x 36 input: ceil(40 / 8) x ceil(36 / 8) cells (stride 16 would give 3 x 3)
    assert model.class_maps(torch.zeros(1, 3, 40, 36)).shape == (1, 2, 5, 5)
    assert json.loads(artifacts.metrics_path(out).read_text())["history"][0]["loss_er"] > 0
    # make-cam rebuilds the stride-8 network from the checkpoint and writes full-resolution CAMs
    result = CliRunner().invoke(cli, ["make-cam", "--root", str(root), "--checkpoint", str(out / "last.pth"),
                                      "--out", str(tmp_path / "cams"), "--scales", "1.0", "--device", "cpu",
                                      "--workers", "0"])
    assert result.exit_code == 0, result.output
    keys, cams = artifacts.read_cam(artifacts.cam_path(tmp_path / "cams", "t2"))
    assert keys.tolist() == [1, 2] and cams.shape == (2, 40, 40)
    # a stride the network cannot be built with is refused while parsing
    result = train(root, tmp_path / "other", "--epochs", "1", "--output-stride", "4")
    assert result.exit_code == 2 and "--output-stride" in result.output and "Traceback" not in result.output


def test_lse_pooling_is_stored_and_make_cam_logits_use_it(root, tmp_path):
    out = tmp_path / "cls"
    result = train(root, out, "--epochs", "1", "--pooling", "lse", "--lse-r", "3")
    assert result.exit_code == 0, result.output
    checkpoint = artifacts.load_checkpoint(artifacts.checkpoint_path(out, "last"))
    assert checkpoint["arch"]["pooling"] == "lse" and checkpoint["arch"]["lse_r"] == 3.0
    assert json.loads((out / "config.json").read_text())["config"]["pooling"] == "lse"
    from wsss.cam import multiscale_cam
    from wsss.models.classifier import load_classifier, lse_pool

    model = load_classifier(checkpoint)
    images = torch.randn(1, 3, 40, 40)
    _, logits = multiscale_cam(model, images, scales=(1.0,), flip=False)
    torch.testing.assert_close(logits, lse_pool(model.class_maps(images), 3.0))
    # resuming with another pooling is a changed schedule
    result = train(root, out, "--epochs", "1", "--pooling", "gap")
    assert result.exit_code == 1 and "--pooling" in result.output
    result = train(root, out, "--epochs", "1", "--pooling", "lse", "--lse-r", "2")
    assert result.exit_code == 1 and "--lse-r" in result.output
    for bad in ("0", "0.05", "nan"):
        result = train(root, tmp_path / "other", "--epochs", "1", "--pooling", "lse", "--lse-r", bad)
        assert result.exit_code == 2 and "--lse-r" in result.output and "Traceback" not in result.output


def test_a_run_replays_from_its_config_json(root, tmp_path):
    """`wsss train-cls --config <run>/config.json` is the same run: the same weights, elsewhere."""
    first = tmp_path / "cls"
    result = train(root, first, "--epochs", "1", "--er-weight", "0.5", "--scale-range", "0.8,1.2", "--no-jitter")
    assert result.exit_code == 0, result.output
    replay = tmp_path / "replay"
    result = CliRunner().invoke(cli, ["train-cls", "--config", str(artifacts.config_path(first)), "--out", str(replay)])
    assert result.exit_code == 0, result.output
    assert_same_weights(weights(first), weights(replay))
    before = json.loads(artifacts.config_path(first).read_text())["config"]
    after = json.loads(artifacts.config_path(replay).read_text())["config"]
    assert {**before, "out_dir": None} == {**after, "out_dir": None}
    assert after["er_weight"] == 0.5 and after["scale_range"] == [0.8, 1.2] and after["sgd"]["lr"] == 0.01


def test_a_toml_config_file_with_command_line_overrides(root, tmp_path):
    settings = tmp_path / "cls.toml"
    settings.write_text(f'root = "{root}"\nbackbone = "resnet18"\nweights = "none"\ncrop_size = 32\nbatch_size = 2\n'
                        'device = "cpu"\nworkers = 0\nepochs = 3\nlr = 0.02\n')
    result = CliRunner().invoke(cli, ["train-cls", "--config", str(settings), "--out", str(tmp_path / "cls"),
                                      "--epochs", "1", "--val-split", "none"])
    assert result.exit_code == 0, result.output
    config = json.loads(artifacts.config_path(tmp_path / "cls").read_text())["config"]
    assert config["epochs"] == 1 and config["sgd"]["lr"] == 0.02 and config["val_split"] is None


def test_select_names_the_val_metric_as_train_seg_does_and_reads_earlier_names():
    from wsss.stages.train_cls import TrainClsConfig
    from wsss.stages.train_seg import TrainSegConfig
    from wsss.settings import build

    for config in (TrainClsConfig, TrainSegConfig):
        choices = next(f for f in dataclasses.fields(config) if f.name == "select").metadata["choices"]
        assert all(choice == "last" or choice.startswith("val-") for choice in choices), choices
    # a config.json of a run before the rename replays
    values = {"root": "data", "out_dir": "cls"}
    assert build(TrainClsConfig, {**values, "select": "map"}).select == "val-map"
    assert build(TrainClsConfig, {**values, "select": "cam-miou"}).select == "val-cam-miou"
    with pytest.raises(ValueError, match="choose from val-map, val-cam-miou, last"):
        build(TrainClsConfig, {**values, "select": "miou"})


# --------------------------------------------------------------------------- it learns


def test_learns_the_toy_data_loss_map_and_cams(tmp_path):
    """24 steps on red squares and blue discs: the loss falls, the classes are told apart and the CAMs find them.

    96 px images: at stride 16 a 48 px image has 3 x 3 CAM cells, each of which sees the whole image,
    and the CAMs of a network trained from scratch then cover it all.  Here they are still diffuse (a
    low level everywhere, a peak on the object), hence the high background threshold 0.7.
    """
    splits = make_toy_dataset(tmp_path / "toy", num_train=48, num_val=12, size=96)
    out = tmp_path / "cls"
    result = CliRunner().invoke(cli, [
        "train-cls", "--root", str(tmp_path / "toy"), "--out", str(out), "--backbone", "resnet18", "--weights", "none",
        "--crop-size", "96", "--scale-range", "0.8,1.2", "--no-jitter", "--batch-size", "8", "--epochs", "4",
        "--lr", "0.005", "--val-cam-threshold", "0.7", "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 0, result.output
    history = json.loads(artifacts.metrics_path(out).read_text())["history"]
    first, last = history[0], history[-1]  # one record per epoch, the mean loss of its 6 steps
    assert last["loss"] < first["loss"] / 2, [record["loss"] for record in history]
    # an untrained network scores about 0.6-0.8 here (random features already see colour)
    assert last["val_map"] >= 0.9, last
    # the CAMs must beat the labellings that need no learning -- a CAM over the whole image, an empty one --
    # by a fifth of the IoU scale (on these masks those score about 0.08 and 0.28, the untrained network's 0.3)
    floor = max(trivial_mious(read_masks(tmp_path / "toy", splits["val"])).values())
    assert last["val_cam_miou"] >= floor + 0.2, (last["val_cam_miou"], floor)
