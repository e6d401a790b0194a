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


# --------------------------------------------------------------------------- every reader checks what it reads


def _cam_file(tmp_path, name="c.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _valid_cam(tmp_path) -> bytes:
    path = tmp_path / "valid.npz"
    artifacts.write_cam(path, np.array([1, 2]), np.stack([np.eye(3, 4), np.full((3, 4), 0.5)]))
    return path.read_bytes()


@pytest.mark.parametrize("cut", [0, 10, 100, -30, -1])
def test_truncated_or_empty_cam_is_one_wsss_error_naming_the_file(tmp_path, cut):
    data = _valid_cam(tmp_path)
    path = tmp_path / "cut.npz"
    path.write_bytes(data[:cut])  # 0: an empty file (numpy raised EOFError; click printed "Aborted!")
    with pytest.raises(WsssError, match=r"cut\.npz: not a valid CAM file"):
        artifacts.read_cam(path)
    assert not artifacts.cam_is_complete(path)


@pytest.mark.parametrize("arrays, message", [
    ({"keys": np.array([1]), "cams": np.full((1, 2, 2), np.nan, np.float16)}, "NaN or infinite"),
    ({"keys": np.array([1]), "cams": np.full((1, 2, 2), np.inf, np.float16)}, "NaN or infinite"),
    ({"keys": np.array([1]), "cams": np.full((1, 2, 2), 1.5, np.float16)}, r"span \[1.5, 1.5\]"),
    ({"keys": np.array([1]), "cams": np.full((1, 2, 2), -0.25, np.float16)}, r"span \[-0.25, -0.25\]"),
    ({"keys": np.array([0]), "cams": np.zeros((1, 2, 2), np.float16)}, r"keys \[0\]"),
    ({"keys": np.array([2, 2]), "cams": np.zeros((2, 2, 2), np.float16)}, "repeat a class"),
    ({"keys": np.array([1.0]), "cams": np.zeros((1, 2, 2), np.float16)}, "dtypes keys float64"),
    ({"keys": np.array([1]), "cams": np.zeros((2, 2), np.float16)}, r"shapes keys \(1,\), cams \(2, 2\)"),
    ({"keys": np.array([1, 2]), "cams": np.zeros((1, 2, 2), np.float16)}, "shapes"),
    ({"cams": np.zeros((1, 2, 2), np.float16)}, "no keys array"),
])
def test_cam_reader_rejects_bad_content(tmp_path, arrays, message):
    path = _cam_file(tmp_path, **arrays)
    with pytest.raises(WsssError, match=rf"c\.npz: .*{message}"):
        artifacts.read_cam(path)
    assert not artifacts.cam_is_complete(path)


def test_cam_values_within_float16_rounding_of_one_are_accepted(tmp_path):
    path = _cam_file(tmp_path, keys=np.array([1]), cams=np.full((1, 2, 2), 1.0005, np.float32))
    assert artifacts.read_cam(path)[1].max() == pytest.approx(1.0005)


def test_cam_keys_are_checked_against_the_class_count(tmp_path):
    path = tmp_path / "k.npz"
    artifacts.write_cam(path, np.array([3, 20]), np.zeros((2, 2, 2)))
    assert artifacts.read_cam(path, num_classes=21)[0].tolist() == [3, 20]
    with pytest.raises(WsssError, match=r"k\.npz: CAM keys \[3, 20\] are not the dataset's foreground class "
                                        r"indices \(1\.\.5\)"):
        artifacts.read_cam(path, num_classes=6)
    assert artifacts.cam_is_complete(path, 21) and not artifacts.cam_is_complete(path, 6)


def test_a_single_npy_array_named_npz_is_not_a_cam(tmp_path):
    path = tmp_path / "single.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.zeros((1, 2, 2)))
    with pytest.raises(WsssError, match="single.npz: not a valid CAM file .*not an .npz archive"):
        artifacts.read_cam(path)


def test_cam_writer_refuses_non_finite_values(tmp_path):
    with pytest.raises(WsssError, match="NaN"):
        artifacts.write_cam(tmp_path / "n.npz", np.array([1]), np.full((1, 2, 2), np.nan))
    assert not (tmp_path / "n.npz").exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"\x93NUMPY\x01\x00", "not a plain .npy"),
])
def test_empty_or_truncated_reliability_map_is_a_wsss_error(tmp_path, content, message):
    path = tmp_path / "r.npy"
    path.write_bytes(content)
    with pytest.raises(WsssError, match=rf"r\.npy: .*{message}"):
        artifacts.read_reliability(path)


@pytest.mark.parametrize("array, message", [
    (np.array([[1.0, np.nan]], np.float16), "NaN or infinite"),
    (np.array([[1.0, -0.5]], np.float16), r"negative weights \(min -0.5\)"),
    (np.ones((1, 2, 2), np.float16), r"shape \(1, 2, 2\)"),
    (np.array([["a", "b"]]), "dtype <U1"),
])
def test_reliability_reader_rejects_bad_values(tmp_path, array, message):
    path = tmp_path / "r.npy"
    np.save(path, array)
    with pytest.raises(WsssError, match=rf"r\.npy: .*{message}"):
        artifacts.read_reliability(path)


def test_reliability_writer_refuses_non_finite_values(tmp_path):
    with pytest.raises(WsssError, match="NaN"):
        artifacts.write_reliability(tmp_path / "r.npy", np.array([[np.inf, 1.0]]))
    assert os.listdir(tmp_path) == []


def test_label_png_values_are_checked_against_the_class_count(tmp_path):
    path = artifacts.label_path(tmp_path, "x")
    artifacts.write_label_png(path, np.array([[0, 5, 255], [50, 1, 2]], np.uint8))
    with pytest.raises(WsssError, match=r"x\.png: label map holds class index 50; the dataset's classes are 0\.\.20"):
        artifacts.read_label_png(path, num_classes=21)
    artifacts.write_label_png(path, np.array([[0, 5, 255], [20, 1, 2]], np.uint8))
    assert artifacts.read_label_png(path, num_classes=21)[1, 0] == 20


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_empty_or_truncated_label_png_is_a_wsss_error(tmp_path, content):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(WsssError, match=r"x\.png: not a readable label PNG"):
        artifacts.read_label_png(path)


def test_json_is_strict_both_ways(tmp_path):
    path = tmp_path / "metrics.json"
    # NaN and infinities (an undefined mIoU, a diverged loss) are written as null: the file stays valid JSON
    artifacts.write_json(path, {"miou": float("nan"), "loss": [1.5, float("inf")], "x": np.float32("-inf")})
    assert path.read_text() == '{\n  "miou": null,\n  "loss": [\n    1.5,\n    null\n  ],\n  "x": null\n}\n'
    path.write_text('{"miou": NaN}')
    with pytest.raises(WsssError, match=r"metrics\.json: not a valid JSON file \(NaN is not a JSON number\)"):
        artifacts.read_json(path)
    path.write_text("[1, 2]")
    assert artifacts.read_json(path) == [1, 2]
    with pytest.raises(WsssError, match=r"metrics\.json: expected an object \{\.\.\.\} at the top level of the JSON, "
                                        "got list"):
        artifacts.read_json(path, expect=dict)
    with pytest.raises(WsssError, match="is a folder"):
        artifacts.read_json(tmp_path)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_mode_the_umask_allows(tmp_path, umask, mode):
    # a temporary file from mkstemp is 0600; the artifact must be readable like any other program's output
    script = textwrap.dedent(f"""
        import os
        os.umask({umask})
        from wsss import artifacts
        artifacts.write_json({str(tmp_path / "a.json")!r}, {{"a": 1}})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode


def test_checkpoint_reader_checks_the_layout_and_the_weights(tmp_path):
    good = {"model": {"w": torch.ones(2)}, "arch": {"backbone": "resnet18"}, "classes": ["background", "cat"],
            "config": {}}
    path = tmp_path / "c.pth"
    torch.save({"w": torch.ones(2)}, path)  # a bare state dict belongs to --weights
    with pytest.raises(WsssError, match=r"c\.pth: not a wsss checkpoint \(no 'model' state dict"):
        artifacts.load_checkpoint(path)
    torch.save({**good, "classes": None}, path)
    with pytest.raises(WsssError, match=r"c\.pth: not a wsss checkpoint \(no 'classes' entry\)"):
        artifacts.load_checkpoint(path)
    torch.save({**good, "model": {"w": torch.tensor([1.0, float("nan")])}}, path)
    with pytest.raises(WsssError, match=r"c\.pth: weight 'w' holds NaN or infinite values"):
        artifacts.load_checkpoint(path)
    with pytest.raises(WsssError, match=r"checkpoint not found \(it is a folder\)"):
        artifacts.load_checkpoint(tmp_path)
    path.write_bytes(b"")
    with pytest.raises(WsssError, match=r"c\.pth: not a readable wsss checkpoint"):
        artifacts.load_checkpoint(path)


def test_run_layout_names_every_stage_folder(tmp_path):
    layout = artifacts.RUN_LAYOUT
    assert [layout.folder(tmp_path, stage).name for stage in ("cls", "cams", "pseudo", "seg", "pred")] == \
        ["cls", "cams", "pseudo", "seg", "pred"]
    assert layout.pred_folder(tmp_path, "train") == tmp_path / "pred_train"
    assert layout.pred_folder(tmp_path) == tmp_path / "pred"


def test_find_images_ids_order_and_what_it_leaves_out(tmp_path):
    from wsss.artifacts import find_images

    photos = tmp_path / "photos"
    for relative in ("b.jpg", "a.PNG", "trip/c.webp", ".hidden/d.jpg", ".e.jpg", "pred/a.png", "notes.txt"):
        (photos / relative).parent.mkdir(parents=True, exist_ok=True)
        (photos / relative).write_bytes(b"x")
    single = tmp_path / "x.bmp"
    single.write_bytes(b"x")
    found = find_images([single, photos], skip=photos / "pred")
    assert list(found) == ["x", "a", "b", "trip/c"]  # in the order given, each folder sorted
    assert found["trip/c"] == photos / "trip" / "c.webp"
    # the same file reached twice (a folder and, relative, the file in it) is one image
    assert list(find_images([photos / "b.jpg", photos], skip=photos / "pred")) == ["b", "a", "trip/c"]
    (photos / "b.png").write_bytes(b"x")
    with pytest.raises(WsssError, match=r"b.png: has the id 'b' of .*b.jpg"):
        find_images([photos])
    with pytest.raises(WsssError, match="nowhere: no such file or folder"):
        find_images([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(WsssError, match="empty: no images"):
        find_images([tmp_path / "empty"])
