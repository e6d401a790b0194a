import numpy as np
from click.testing import CliRunner

from wsss.stages.cli import cli
from wsss import artifacts
from wsss.datasets import SplitSpec, write_prepared
from wsss.visualize import cam_heatmap, colorize_label, grid, labelled_tile, overlay_label

CLASSES = ["background", "cat", "dog"]


def make_run(tmp_path):
    root, run = tmp_path / "data", tmp_path / "run"
    ids = ["a", "b", "c"]
    for index, image_id in enumerate(ids):
        artifacts.write_image(root / "images" / f"{image_id}.png", np.full((12, 16, 3), 60 * index, np.uint8))
        mask = np.zeros((12, 16), np.uint8)
        mask[2:8, 3:9] = 1 + index % 2
        artifacts.write_label_png(artifacts.label_path(root / "masks", image_id), mask)
        cams = np.zeros((1, 12, 16), np.float32)
        cams[0, 2:8, 3:9] = 1.0
        artifacts.write_cam(artifacts.cam_path(run / "cams", image_id), [1 + index % 2], cams)
        artifacts.write_label_png(artifacts.label_path(run / "pseudo", image_id), mask)
    spec = SplitSpec(image_dir="images", image_ext=".png", mask_dir="masks")
    write_prepared(root, "folder", CLASSES, {"train": (spec, ids)}, {"a": [1], "b": [2], "c": [1]})
    artifacts.write_json(artifacts.config_path(run / "cams"), {"config": {"root": str(root), "dataset": "folder",
                                                                          "split": "train"}})
    per_class = {"background": {"iou": 0.9}, "cat": {"iou": 0.5}, "dog": {"iou": 0.25}}
    artifacts.write_json(artifacts.eval_metrics_path(run / "cams", "train"),
                         {"split": "train", "miou": 0.55, "best_threshold": 0.2, "summary": {"per_class": per_class}})
    artifacts.write_json(artifacts.eval_metrics_path(run / "pseudo", "train"),
                         {"split": "train", "miou": 0.625, "summary": {"per_class": per_class}})
    artifacts.write_json(artifacts.metrics_path(run / "cls"), {"history": [
        {"round": 1, "step": 4, "loss": 0.8, "loss_cls": 0.7, "loss_er": 0.1, "val_map": 0.5},
        {"round": 2, "step": 8, "loss": 0.58, "loss_cls": 0.5, "loss_er": 0.08, "val_map": 0.7}]})
    artifacts.write_json(artifacts.metrics_path(run / "seg"), {"weak_full_ratio": 0.8, "history": [
        {"step": 10, "loss": 1.0}, {"round": 1, "step": 20, "loss": 0.5, "val_miou": 0.4}]})
    return run


def test_report_writes_markdown_and_figures(tmp_path):
    run = make_run(tmp_path)
    result = CliRunner().invoke(cli, ["report", str(run), "--gallery-rows", "2"])
    assert result.exit_code == 0, result.output
    assert "CAM              train      0.5500" in result.output
    text = (run / "report.md").read_text()
    assert "| CAM | train | 55.0 | best background threshold (threshold 0.20) |" in text
    assert "| pseudo-labels | train | 62.5 |" in text
    assert "| dog | 25.0 | 25.0 |" in text
    assert "weak/full ratio (DeepLab on pseudo-labels / on ground truth): 0.800" in text
    for name in ("stage_miou", "per_class_iou", "curves", "gallery"):
        assert (run / "report" / f"{name}.png").is_file()
        assert f"report/{name}.png" in text
    picture = artifacts.read_image(run / "report" / "gallery.png")
    # two rows of 18 px caption + 128 px tile, one 4 px gap; five tiles per row
    assert picture.shape[0] == 2 * (18 + 128) + 4
    assert picture.shape[1] > 5 * 128


def test_report_without_evaluations_is_a_clear_error(tmp_path):
    (tmp_path / "run").mkdir()
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "run")])
    assert result.exit_code != 0 and "Error:" in result.output and "no stage evaluation" in result.output
    assert "Traceback" not in result.output


def test_report_of_a_file_or_bad_rows_is_a_usage_error(tmp_path):
    (tmp_path / "run.txt").write_text("not a run")
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "run.txt")])
    assert result.exit_code == 2 and "Invalid value for 'RUN_DIR'" in result.output and "is a file" in result.output
    result = CliRunner().invoke(cli, ["report", str(tmp_path), "--gallery-rows", "-1"])
    assert result.exit_code == 2 and "Invalid value for '--gallery-rows'" in result.output


def test_colorize_and_overlay_use_the_voc_palette():
    label = np.array([[0, 1], [255, 12]], np.uint8)
    colours = colorize_label(label)
    assert colours[0, 1].tolist() == [128, 0, 0] and colours[1, 1].tolist() == [64, 0, 128]
    image = np.full((2, 2, 3), 100, np.uint8)
    blended = overlay_label(image, label, alpha=0.5)
    assert blended[0, 0].tolist() == [100, 100, 100] and blended[1, 0].tolist() == [100, 100, 100]
    assert blended[0, 1].tolist() == [114, 50, 50]  # (100 + 128) / 2, (100 + 0) / 2


def test_heatmap_and_grid_shapes():
    image = np.zeros((10, 20, 3), np.uint8)
    heat = cam_heatmap(image, np.ones((2, 10, 20), np.float32))
    assert heat.shape == (10, 20, 3) and heat[..., 0].mean() > heat[..., 2].mean()  # jet's top is red
    tile = labelled_tile(image, "x", 30)
    assert tile.shape == (48, 60, 3)
    assert grid([[tile, tile], [tile]]).shape == (48 * 2 + 4, 124, 3)
