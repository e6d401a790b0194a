"""wsss/report.py's figures, drawn directly: each is a valid PNG of its figure's size (inches x 110 dpi) that
shows what it plots.  The command around them: tests/stages/test_report.py."""

import matplotlib
import numpy as np
import pytest
from PIL import Image

from wsss.report import StageResult, plot_curves, plot_per_class, plot_stage_miou

matplotlib.use("Agg")  # as write_report does: no display

PER_CLASS = {"background": {"iou": 0.9}, "cat": {"iou": 0.5}, "dog": {"iou": None}}
RESULTS = [StageResult("cams", "CAM", "train", 0.55, PER_CLASS), StageResult("pred", "DeepLab", "val", None, PER_CLASS)]


def _png(path) -> np.ndarray:
    """The RGB pixels of a PNG file, after checking that it is one and complete."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()  # a truncated or corrupt file raises
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _has_colour(pixels: np.ndarray, hex_colour: str) -> bool:
    rgb = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
    return bool((np.abs(pixels.astype(int) - rgb).max(axis=2) <= 2).any())


def test_stage_miou_bar_chart(tmp_path):
    plot_stage_miou(RESULTS, tmp_path / "stage_miou.png")
    pixels = _png(tmp_path / "stage_miou.png")
    assert pixels.shape == (396, 550, 3)  # (1.8 + 1.6 x 2 stages) x 3.6 inches at 110 dpi
    assert _has_colour(pixels, "#4c72b0")  # the first stage's bar


def test_per_class_bar_chart(tmp_path):
    plot_per_class(RESULTS, tmp_path / "per_class.png")
    pixels = _png(tmp_path / "per_class.png")
    assert pixels.shape == (418, 660, 3)  # max(6, 0.6 x 3 classes x 2 stages + 2) x 3.8 inches
    assert _has_colour(pixels, "#1f77b4") and _has_colour(pixels, "#ff7f0e")  # one colour per stage


def test_training_curves(tmp_path):
    cls_history = [{"round": 1, "step": 4, "loss": 0.8, "loss_cls": 0.7, "val_map": 0.5},
                   {"step": 6, "loss": 0.7},  # a log record between epochs: not plotted per epoch
                   {"round": 2, "step": 8, "loss": 0.6, "loss_cls": 0.5, "val_map": 0.7}]
    seg_history = [{"step": 10, "loss": 1.0}, {"round": 1, "step": 20, "loss": 0.5, "val_miou": 0.4}]
    assert plot_curves(cls_history, seg_history, tmp_path / "curves.png") is True
    pixels = _png(tmp_path / "curves.png")
    assert pixels.shape == (396, 1430, 3)  # 13 x 3.6 inches
    assert _has_colour(pixels, "#c44e52")  # the val mIoU line


def test_no_history_draws_no_curves(tmp_path):
    assert plot_curves([], [], tmp_path / "curves.png") is False
    assert not (tmp_path / "curves.png").exists()


@pytest.mark.parametrize("plot", [plot_stage_miou, plot_per_class])
def test_a_figure_replaces_an_older_file_whole(tmp_path, plot):
    path = tmp_path / "figure.png"
    path.write_bytes(b"not a png")
    plot(RESULTS, path)
    _png(path)
    assert not [other for other in tmp_path.iterdir() if other != path]  # no temporary file left
