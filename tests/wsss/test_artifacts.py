import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from wsss import artifacts
from wsss.errors import WsssError


def test_cam_round_trip_keeps_keys_and_float16_values(tmp_path):
    keys = np.array([3, 15])
    cams = np.stack([np.linspace(0, 1, 12).reshape(3, 4), np.eye(3, 4)]).astype(np.float32)
    path = artifacts.cam_path(tmp_path, "2007_000032")
    artifacts.write_cam(path, keys, cams)
    assert path.name == "2007_000032.npz"
    with np.load(path, allow_pickle=False) as raw:  # the file itself holds int16 / float16, no pickle
        assert raw["keys"].dtype == np.int16 and raw["cams"].dtype == np.float16
    read_keys, read_cams = artifacts.read_cam(path)
    assert read_keys.tolist() == [3, 15]
    np.testing.assert_allclose(read_cams, cams, atol=1e-3)
    assert artifacts.cam_is_complete(path)


def test_cam_writer_rejects_background_key_and_shape_mismatch(tmp_path):
    with pytest.raises(ValueError):
        artifacts.write_cam(tmp_path / "a.npz", np.array([0]), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError):
        artifacts.write_cam(tmp_path / "a.npz", np.array([1, 2]), np.zeros((1, 2, 2)))


def test_irn_npy_needs_explicit_allow_pickle(tmp_path):
    path = artifacts.irn_cam_path(tmp_path, "img")
    high_res = np.random.default_rng(0).random((2, 5, 6)).astype(np.float32)
    np.save(path, {"keys": np.array([0, 14]), "high_res": high_res}, allow_pickle=True)
    with pytest.raises(WsssError, match="allow-pickle"):
        artifacts.read_cam(path)
    keys, cams = artifacts.read_cam(path, allow_pickle=True)
    assert keys.tolist() == [1, 15]  # IRN counts foreground classes from 0
    np.testing.assert_array_equal(cams, high_res)


def test_corrupt_cam_file_is_a_wsss_error(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(WsssError, match="bad.npz"):
        artifacts.read_cam(path)
    assert not artifacts.cam_is_complete(path)


def test_label_png_is_palette_and_round_trips(tmp_path):
    from PIL import Image

    label = np.array([[0, 1, 255], [20, 7, 0]], dtype=np.uint8)
    path = artifacts.label_path(tmp_path, "x")
    artifacts.write_label_png(path, label)
    with Image.open(path) as image:
        assert image.mode == "P"
        assert image.getpalette()[3:6] == [128, 0, 0]  # VOC colour of class 1 (aeroplane)
    np.testing.assert_array_equal(artifacts.read_label_png(path), label)


def test_voc_palette_known_colours():
    palette = artifacts.voc_palette()
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[255].tolist() == [224, 224, 192]  # ignore


def test_reliability_round_trip_without_pickle(tmp_path):
    weight = np.array([[0.5, 1.0], [1.5, 2.0]])
    path = artifacts.reliability_path(tmp_path, "x")
    artifacts.write_reliability(path, weight)
    assert np.load(path, allow_pickle=False).dtype == np.float16
    np.testing.assert_allclose(artifacts.read_reliability(path), weight)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = torch.nn.Conv2d(3, 4, 1)
    checkpoint = {"model": model.state_dict(), "config": {"lr": 0.1}, "classes": ["background", "cat"],
                  "arch": {"backbone": "resnet18"}, "epoch": 3}
    path = artifacts.checkpoint_path(tmp_path, "best")
    artifacts.save_checkpoint(path, checkpoint)
    loaded = artifacts.load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["classes"] == ["background", "cat"]
    torch.testing.assert_close(loaded["model"]["weight"], model.weight.detach())


def test_checkpoint_load_errors_name_the_file(tmp_path):
    with pytest.raises(WsssError, match="missing.pth"):
        artifacts.load_checkpoint(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(WsssError, match="bad.pth"):
        artifacts.load_checkpoint(bad)


def test_json_round_trip_handles_paths_and_numpy(tmp_path):
    path = artifacts.metrics_path(tmp_path)
    artifacts.write_json(path, {"miou": np.float32(0.5), "dir": tmp_path / "x", "counts": np.arange(2)})
    assert artifacts.read_json(path) == {"miou": 0.5, "dir": str(tmp_path / "x"), "counts": [0, 1]}


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with artifacts.atomic_write(path, "w") as handle:
            handle.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]


def test_killed_writer_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "cam.npz"
    artifacts.write_cam(target, np.array([1]), np.ones((1, 4, 4)))
    before = target.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal
        from wsss import artifacts
        with artifacts.atomic_write({str(target)!r}) as handle:
            handle.write(b"PK partial bytes")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script])
    assert result.returncode == -signal.SIGKILL
    assert target.read_bytes() == before  # the old, complete file is still there
    keys, cams = artifacts.read_cam(target)
    assert keys.tolist() == [1] and cams.shape == (1, 4, 4)
