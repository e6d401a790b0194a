"""The Python API: `import wsss` stays light, and each call gives what the matching command writes."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import wsss
from wsss import artifacts
from wsss.datasets.prepared import SplitSpec, write_prepared
from wsss.errors import WsssError
from wsss.models.deeplab import build_seg_model
from wsss.stages.cli import cli

CLASSES = ["background", "square"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    base = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    model = build_seg_model("deeplabv3_resnet18", len(CLASSES))
    path = base / "seg" / "best.pth"
    artifacts.save_checkpoint(path, {"model": model.state_dict(), "config": {}, "classes": CLASSES,
                                     "arch": {"model": "deeplabv3_resnet18", "num_classes": len(CLASSES)}})
    return path


def test_import_wsss_loads_neither_torch_nor_opencv():
    code = ("import sys, wsss; wsss.__version__; "
            "print(sorted(m for m in ('torch', 'cv2', 'sklearn') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    with pytest.raises(AttributeError, match="no attribute 'load_modle'"):
        wsss.load_modle


def test_predict_gives_the_label_map_that_wsss_predict_writes(checkpoint, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (41, 57, 3), dtype=np.uint8)
    artifacts.write_image(tmp_path / "photo.png", image)
    result = CliRunner().invoke(cli, ["predict", "--checkpoint", str(checkpoint.parent), "--images",
                                      str(tmp_path / "photo.png"), "--out", str(tmp_path / "pred"), "--device", "cpu",
                                      "--workers", "0"])
    assert result.exit_code == 0, result.output
    written = artifacts.read_label_png(artifacts.label_path(tmp_path / "pred", "photo"))
    model = wsss.load_model(checkpoint.parent, device="cpu")  # the folder: its best.pth
    assert model.classes == CLASSES and model.checkpoint == checkpoint
    label = model.predict(image)
    assert label.dtype == np.uint8 and label.shape == (41, 57)
    np.testing.assert_array_equal(label, written)
    np.testing.assert_array_equal(model.predict(tmp_path / "photo.png"), written)  # a path reads the file
    np.testing.assert_array_equal(wsss.read_image(tmp_path / "photo.png"), image)
    assert wsss.load_model(checkpoint, device=torch.device("cpu")).device == torch.device("cpu")
    with pytest.raises(ValueError, match="max_side must be None or an integer of at least 16"):
        model.predict(image, max_side="none")
    probs = model.probabilities(image, scales=[1.0], flip=False)
    assert probs.shape == (2, 41, 57) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(model.predict(image, scales=[1.0], flip=False), probs.argmax(0))
    # gray and RGBA arrays are images too; other arrays are refused with what was expected
    gray = image[:, :, 0]
    np.testing.assert_array_equal(model.predict(gray), model.predict(np.repeat(gray[:, :, None], 3, 2)))
    rgba = np.concatenate([image, np.full((41, 57, 1), 7, np.uint8)], 2)
    np.testing.assert_array_equal(model.predict(rgba), label)
    with pytest.raises(ValueError, match="uint8"):
        model.predict(image.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        model.predict(image[None])


def test_read_cam_returns_what_make_cam_wrote(tmp_path):
    cams = np.zeros((2, 4, 5), np.float32)
    cams[0, 1, 2], cams[1] = 1.0, 0.5
    artifacts.write_cam(tmp_path / "a.npz", np.array([3, 1]), cams)
    keys, read = wsss.read_cam(tmp_path / "a.npz")
    assert keys.tolist() == [3, 1] and keys.dtype == np.int64
    np.testing.assert_array_equal(read, cams)
    with pytest.raises(WsssError, match="missing.npz: CAM file not found"):
        wsss.read_cam(tmp_path / "missing.npz")


def test_evaluate_takes_paths_and_gives_the_hand_computed_miou(tmp_path):
    root = tmp_path / "data"
    mask = np.zeros((4, 4), np.uint8)
    mask[:, :2] = 1                        # ground truth: left half square
    pred = np.zeros((4, 4), np.uint8)
    pred[:, :3] = 1                        # prediction: three quarters square
    artifacts.write_image(root / "images" / "a.png", np.zeros((4, 4, 3), np.uint8))
    artifacts.write_label_png(root / "masks" / "a.png", mask)
    artifacts.write_label_png(tmp_path / "pred" / "a.png", pred)
    write_prepared(root, "folder", CLASSES, {"val": (SplitSpec(image_dir="images", image_ext=".png",
                                                               mask_dir="masks"), ["a"])}, {"a": [1]})
    scores = wsss.evaluate(str(tmp_path / "pred"), str(root), "val", workers=0)
    # square: 8 / 12; background: 4 / 8
    assert scores["per_class"]["square"]["iou"] == pytest.approx(8 / 12)
    assert scores["per_class"]["background"]["iou"] == pytest.approx(4 / 8)
    assert scores["miou"] == pytest.approx((8 / 12 + 4 / 8) / 2)
