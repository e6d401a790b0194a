import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from wsss.stages.cli import cli
from wsss.stages.predict import PredictConfig, _label_settings
from wsss import artifacts
from wsss.crf import POSTPROCESS_CRF
from wsss.datasets.prepared import PreparedDataset, SplitSpec, write_prepared
from wsss.metrics import ConfusionMatrix
from wsss.models.deeplab import build_seg_model
from wsss.segmentation import predict_label, predict_probs

torch.set_num_threads(1)

CLASSES = ["background", "square"]
SIZES = {"odd0": (37, 29), "odd1": (31, 45), "odd2": (33, 33)}


@pytest.fixture()
def setup(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(1)
    for image_id, (height, width) in SIZES.items():
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        mask = np.zeros((height, width), np.uint8)
        mask[5:20, 7:19] = 1
        artifacts.write_image(root / "images" / f"{image_id}.png", image)
        artifacts.write_label_png(root / "masks" / f"{image_id}.png", mask)
    spec = SplitSpec(image_dir="images", image_ext=".png", mask_dir="masks")
    write_prepared(root, "folder", CLASSES, {"val": (spec, list(SIZES))}, {i: [1] for i in SIZES})
    torch.manual_seed(0)
    model = build_seg_model("deeplabv3_resnet18", len(CLASSES))
    checkpoint = tmp_path / "seg" / "best.pth"
    artifacts.save_checkpoint(checkpoint, {"model": model.state_dict(), "config": {}, "classes": CLASSES,
                                           "arch": {"model": "deeplabv3_resnet18", "num_classes": len(CLASSES)}})
    return root, checkpoint, model


def predict(root, checkpoint, out, *extra):
    return CliRunner().invoke(cli, ["predict", "--root", str(root), "--checkpoint", str(checkpoint), "--out", str(out),
                                    "--split", "val", "--scales", "1.0,0.75", "--device", "cpu", "--workers", "0",
                                    *extra])


def test_prediction_png_size_equals_image_size_for_odd_sizes(setup, tmp_path):
    root, checkpoint, model = setup
    out = tmp_path / "pred"
    result = predict(root, checkpoint, out, "--overlay", "--eval")
    assert result.exit_code == 0, result.output
    dataset = PreparedDataset.load(root)
    expected_matrix = ConfusionMatrix(len(CLASSES))
    for image_id, size in SIZES.items():
        label = artifacts.read_label_png(artifacts.label_path(out, image_id))
        assert label.shape == size
        overlay = artifacts.read_image(artifacts.overlay_path(out / "overlay", image_id))
        assert overlay.shape == (*size, 3)
        image = dataset.read_image("val", image_id)
        np.testing.assert_array_equal(label, predict_label(model.eval(), image, scales=(1.0, 0.75)))
        expected_matrix.update(dataset.read_mask("val", image_id), label)
    metrics = json.loads(artifacts.metrics_path(out).read_text())
    assert metrics["predicted"] == 3 and metrics["skipped"] == 0 and metrics["scales"] == [1.0, 0.75]
    assert metrics["miou"] == pytest.approx(expected_matrix.miou())
    assert f"val mIoU {metrics['miou']:.4f}" in result.output
    assert json.loads(artifacts.config_path(out).read_text())["arch"]["model"] == "deeplabv3_resnet18"


def test_existing_predictions_are_skipped_unless_overwrite(setup, tmp_path):
    root, checkpoint, _ = setup
    out = tmp_path / "pred"
    assert predict(root, checkpoint, out).exit_code == 0
    artifacts.label_path(out, "odd1").write_bytes(b"not a png")  # a broken file is redone
    result = predict(root, checkpoint, out)
    assert result.exit_code == 0 and "1 predicted, 2 skipped" in result.output
    assert artifacts.read_label_png(artifacts.label_path(out, "odd1")).shape == SIZES["odd1"]
    result = predict(root, checkpoint.parent, out, "--overwrite")  # an output folder means its best.pth
    assert "3 predicted, 0 skipped" in result.output
    assert json.loads(artifacts.metrics_path(out).read_text())["checkpoint"] == str(checkpoint)


def test_resume_refuses_a_folder_predicted_with_other_settings_or_checkpoint(setup, tmp_path):
    root, checkpoint, model = setup
    out = tmp_path / "pred"
    assert predict(root, checkpoint, out).exit_code == 0
    before = {image_id: artifacts.label_path(out, image_id).read_bytes() for image_id in SIZES}
    # label maps without CRF must not be taken for CRF ones (nor those of other scales)
    result = predict(root, checkpoint, out, "--crf", "--scales", "1.0")
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    assert "other settings (--scales, --crf)" in result.output and "--overwrite" in result.output
    assert "Traceback" not in result.output
    # the same checkpoint file written again by a longer training run
    artifacts.save_checkpoint(checkpoint, {"model": model.state_dict(), "config": {}, "classes": CLASSES, "step": 9,
                                           "arch": {"model": "deeplabv3_resnet18", "num_classes": len(CLASSES)}})
    result = predict(root, checkpoint, out)
    assert result.exit_code == 1 and "other settings (--checkpoint)" in result.output
    assert {image_id: artifacts.label_path(out, image_id).read_bytes() for image_id in SIZES} == before
    result = predict(root, checkpoint, out, "--overwrite")
    assert result.exit_code == 0 and "3 predicted, 0 skipped" in result.output
    assert "0 predicted, 3 skipped" in predict(root, checkpoint, out).output  # same settings: resumed
    # CRF settings without --crf do not touch the label maps
    assert "0 predicted, 3 skipped" in predict(root, checkpoint, out, "--crf-iterations", "3").output
    # the run replayed from its config.json has the same settings, so it resumes
    replayed = CliRunner().invoke(cli, ["predict", "--config", str(artifacts.config_path(out))])
    assert replayed.exit_code == 0 and "0 predicted, 3 skipped" in replayed.output, replayed.output


def test_resume_names_the_crf_options_that_changed(setup, tmp_path):
    root, checkpoint, _ = setup
    out = tmp_path / "pred"
    crf = ("--crf", "--crf-iterations", "1", "--crf-scale", "0.5")
    assert predict(root, checkpoint, out, *crf).exit_code == 0
    result = predict(root, checkpoint, out, *crf, "--crf-bilateral-srgb", "5", "--crf-iterations", "2")
    assert result.exit_code == 1 and "other settings (--crf-iterations, --crf-bilateral-srgb)" in result.output
    assert "0 predicted, 3 skipped" in predict(root, checkpoint, out, *crf).output


def test_applied_crf_is_the_crf_group_only_with_crf(tmp_path):
    plain = PredictConfig(root=tmp_path, checkpoint=tmp_path / "best.pth", out_dir=tmp_path / "pred")
    assert plain.applied_crf is None and plain.crf_params == POSTPROCESS_CRF
    assert plain.replace(crf=True).applied_crf == POSTPROCESS_CRF
    # a config.json of the older form, whose crf held the parameters or null, reads the same; one without
    # max_side segmented every image at full size
    old = {"scales": [1.0], "flip": True, "max_side": None}
    assert _label_settings({"scales": [1.0], "flip": True, "crf": None}) == (old, None)
    assert _label_settings({"scales": [1.0], "flip": True, "crf": {"iterations": 2}})[1] == {"iterations": 2}
    assert _label_settings({"scales": [1.0], "flip": True, "crf": True, "crf_params": {"iterations": 2}})[1] == {
        "iterations": 2}
    assert _label_settings({"scales": [1.0], "flip": True, "crf": False, "crf_params": {"iterations": 2}})[1] is None


def test_crf_options_are_checked_before_any_work(setup, tmp_path):
    root, checkpoint, _ = setup
    for option, value, why in (("--crf-gaussian-sxy", "0", "must be > 0"), ("--crf-bilateral-srgb", "nan", "finite"),
                               ("--crf-iterations", "0", "must be >= 1"), ("--crf-scale", "1.5", "must be <= 1")):
        result = predict(root, checkpoint, tmp_path / "pred", "--crf", option, value)
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output and why in result.output
        assert not (tmp_path / "pred").exists()


def test_crf_post_processing_writes_full_size_labels(setup, tmp_path):
    root, checkpoint, model = setup
    out = tmp_path / "crf"
    result = predict(root, checkpoint, out, "--crf", "--crf-iterations", "2", "--no-flip")
    assert result.exit_code == 0, result.output
    dataset = PreparedDataset.load(root)
    crf = POSTPROCESS_CRF.replace(iterations=2)  # the other --crf-* options keep DeepLab's values
    for image_id, size in SIZES.items():
        label = artifacts.read_label_png(artifacts.label_path(out, image_id))
        assert label.shape == size
        # the CRF of the one-image path (float rounding of the folded network may move a rare pixel)
        expected = predict_label(model.eval(), dataset.read_image("val", image_id), scales=(1.0, 0.75), flip=False,
                                 crf=crf)
        assert (label == expected).mean() > 0.99
    assert json.loads(artifacts.metrics_path(out).read_text())["crf"] is True
    assert json.loads(artifacts.config_path(out).read_text())["config"]["crf_params"] == crf.kwargs()
    # with --workers 2 the CRF runs in two processes: the same files
    parallel = tmp_path / "crf_parallel"
    result = predict(root, checkpoint, parallel, "--crf", "--crf-iterations", "2", "--no-flip", "--workers", "2")
    assert result.exit_code == 0, result.output
    for image_id in SIZES:
        np.testing.assert_array_equal(artifacts.read_label_png(artifacts.label_path(parallel, image_id)),
                                      artifacts.read_label_png(artifacts.label_path(out, image_id)))


def test_crf_gaussian_options_reach_the_crf(setup, tmp_path, monkeypatch):
    """--crf-gaussian-sxy and --crf-gaussian-compat are the settings of the CRF of every image (what they change
    there: tests/wsss/test_crf.py)."""
    import wsss.crf

    seen = []
    real_crf = wsss.crf.dense_crf
    monkeypatch.setattr(wsss.crf, "dense_crf", lambda image, probs, **settings: seen.append(settings) or
                        real_crf(image, probs, **settings))
    root, checkpoint, model = setup
    out = tmp_path / "crf"
    result = predict(root, checkpoint, out, "--crf", "--crf-iterations", "2", "--no-flip", "--scales", "1.0",
                     "--crf-gaussian-sxy", "20", "--crf-gaussian-compat", "30")  # --workers 0: the CRF on a thread
    assert result.exit_code == 0, result.output
    crf = POSTPROCESS_CRF.replace(iterations=2, gaussian_sxy=20.0, gaussian_compat=30.0)
    assert seen == [crf.kwargs()] * len(SIZES)
    assert json.loads(artifacts.config_path(out).read_text())["config"]["crf_params"] == crf.kwargs()


def test_checkpoint_for_other_classes_is_an_error(setup, tmp_path):
    root, _, _ = setup
    model = build_seg_model("deeplabv3_resnet18", 3)
    checkpoint = tmp_path / "other.pth"
    artifacts.save_checkpoint(checkpoint, {"model": model.state_dict(), "config": {}, "classes": ["bg", "a", "b"],
                                           "arch": {"model": "deeplabv3_resnet18", "num_classes": 3}})
    result = predict(root, checkpoint, tmp_path / "pred")
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "classes" in result.output
    result = predict(root, tmp_path / "missing.pth", tmp_path / "pred")
    assert result.exit_code == 1 and "checkpoint not found" in result.output


def test_two_shards_write_the_files_of_one_unsharded_run(setup, tmp_path):
    root, checkpoint, _ = setup
    assert predict(root, checkpoint, tmp_path / "whole").exit_code == 0
    for index in (0, 1):
        assert predict(root, checkpoint, tmp_path / "sharded", "--shard", f"{index}/2").exit_code == 0
    for image_id in SIZES:
        assert (artifacts.label_path(tmp_path / "sharded", image_id).read_bytes()
                == artifacts.label_path(tmp_path / "whole", image_id).read_bytes()), image_id
    result = predict(root, checkpoint, tmp_path / "x", "--shard", "1/2", "--eval")
    assert result.exit_code == 2 and "Invalid value for '--eval'" in result.output and "every --shard" in result.output


# --------------------------------------------------------------------------- --images: any image files


def _photos(folder):
    """Images in mixed formats, sizes and colour types, one in a subfolder; returns {id: file}."""
    rng = np.random.default_rng(3)
    files = {}
    for image_id, suffix, (height, width) in (("a", ".png", (37, 29)), ("b", ".jpg", (48, 64)),
                                              ("street/c", ".bmp", (31, 45)), ("d", ".tif", (40, 40)),
                                              ("e", ".webp", (33, 50))):
        path = folder / f"{image_id}{suffix}"
        artifacts.write_image(path, rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        files[image_id] = path
    gray = folder / "gray.png"  # a one-channel PNG: read as RGB
    Image.fromarray(rng.integers(0, 256, (30, 35), dtype=np.uint8)).save(gray)
    files["gray"] = gray
    rotated = folder / "rotated.jpg"  # a phone photo: pixels 30 x 50, shown turned by its EXIF orientation
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(rotated, exif=exif)
    files["rotated"] = rotated
    deep = folder / "deep.png"  # 16 bits per channel
    import cv2
    cv2.imwrite(str(deep), rng.integers(0, 65536, (26, 31, 3), dtype=np.uint16))
    files["deep"] = deep
    (folder / "notes.txt").write_text("not an image")  # other files in the folder are left alone
    return files


def predict_images(checkpoint, out, *paths, extra=()):
    args = ["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--scales", "1.0,0.75", "--device", "cpu",
            "--workers", "0"]
    for path in paths:
        args += ["--images", str(path)]
    return CliRunner().invoke(cli, [*args, *extra])


def test_images_of_any_format_and_size_are_segmented_with_scores(setup, tmp_path):
    _, checkpoint, model = setup
    photos = tmp_path / "photos"
    files = _photos(photos)
    single = tmp_path / "single.jpeg"
    artifacts.write_image(single, np.full((20, 26, 3), 200, np.uint8))
    files["single"] = single
    out = photos / "pred"  # an output folder inside the input folder
    result = predict_images(checkpoint, out, photos, single, extra=["--overlay"])
    assert result.exit_code == 0, result.output
    assert f"{len(files)} predicted, 0 skipped" in result.output
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [row["id"] for row in rows] == sorted(set(files) - {"single"}) + ["single"]  # folders in sorted order
    assert list(rows[0]) == ["id", "file", "background area", "square area", "background score", "square score"]
    assert artifacts.read_image(files["rotated"]).shape == (50, 30, 3)  # decoded as shown, as every stage reads it
    for row in rows:
        image_id, file = row["id"], files[row["id"]]
        image = artifacts.read_image(file)
        label = artifacts.read_label_png(artifacts.label_path(out, image_id))
        assert label.shape == image.shape[:2]
        np.testing.assert_array_equal(label, predict_label(model.eval(), image, scales=(1.0, 0.75)))
        assert artifacts.read_image(artifacts.overlay_path(out / "overlay", image_id)).shape == image.shape
        scores = json.loads((out / "scores" / f"{image_id}.json").read_text())
        assert scores["file"] == str(file) == row["file"]
        areas = np.bincount(label.ravel(), minlength=2) / label.size
        peaks = predict_probs(model, image, scales=(1.0, 0.75)).max((1, 2))
        for index, name in enumerate(CLASSES):
            assert scores["classes"][name]["area"] == pytest.approx(areas[index], abs=1e-6)
            assert scores["classes"][name]["score"] == pytest.approx(peaks[index], abs=1e-4)
            assert float(row[f"{name} area"]) == scores["classes"][name]["area"]
    metrics = json.loads(artifacts.metrics_path(out).read_text())
    assert metrics["split"] is None and metrics["num_images"] == len(files)
    assert json.loads(artifacts.config_path(out).read_text())["classes"] == CLASSES
    # the second run finds its own outputs inside the folder but does not take them for input
    (out / "b.png").write_bytes(b"")  # a damaged label map is redone
    result = predict_images(checkpoint, out, photos, single, extra=["--overlay"])
    assert result.exit_code == 0 and f"1 predicted, {len(files) - 1} skipped" in result.output, result.output


def test_images_larger_than_max_side_are_segmented_smaller_and_labelled_at_full_size(setup, tmp_path):
    _, checkpoint, model = setup
    photo = tmp_path / "big.png"
    image = np.random.default_rng(4).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    artifacts.write_image(photo, image)
    result = predict_images(checkpoint, tmp_path / "pred", photo, extra=["--max-side", "40"])
    assert result.exit_code == 0, result.output
    label = artifacts.read_label_png(artifacts.label_path(tmp_path / "pred", "big"))
    assert label.shape == (90, 120)
    expected = predict_label(model.eval(), image, scales=(1.0, 0.75), max_side=40)
    np.testing.assert_array_equal(label, expected)
    assert not np.allclose(predict_probs(model, image, scales=(1.0, 0.75), max_side=40),
                           predict_probs(model, image, scales=(1.0, 0.75)), atol=1e-3)
    # resuming with another --max-side would mix label maps: refused
    result = predict_images(checkpoint, tmp_path / "pred", photo, extra=["--max-side", "none"])
    assert result.exit_code == 1 and "other settings (--max-side)" in result.output


def test_limit_predicts_and_scores_the_first_images_only(setup, tmp_path):
    root, checkpoint, _ = setup
    out = tmp_path / "pred"
    result = predict(root, checkpoint, out, "--limit", "2", "--eval")
    assert result.exit_code == 0 and "2 predicted, 0 skipped" in result.output, result.output
    assert sorted(path.stem for path in out.glob("*.png")) == ["odd0", "odd1"]
    metrics = json.loads(artifacts.metrics_path(out).read_text())
    labels = [artifacts.read_label_png(artifacts.label_path(out, i)) for i in ("odd0", "odd1")]
    assert metrics["eval"]["num_pixels"] == sum(label.size for label in labels)
    result = predict_images(checkpoint, tmp_path / "photos_pred", root / "images", extra=["--limit", "1"])
    assert result.exit_code == 0 and "1 predicted, 0 skipped" in result.output, result.output
    assert [row["id"] for row in csv.DictReader((tmp_path / "photos_pred" / "scores.csv").open())] == ["odd0"]


def test_crf_with_max_side_runs_at_the_smaller_size_and_labels_the_full_image(setup, tmp_path):
    _, checkpoint, model = setup
    photo = tmp_path / "big.png"
    image = np.random.default_rng(5).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    artifacts.write_image(photo, image)
    result = predict_images(checkpoint, tmp_path / "pred", photo,
                            extra=["--max-side", "40", "--crf", "--crf-iterations", "2"])
    assert result.exit_code == 0, result.output
    label = artifacts.read_label_png(artifacts.label_path(tmp_path / "pred", "big"))
    assert label.shape == (90, 120)
    crf = POSTPROCESS_CRF.replace(iterations=2)
    expected = predict_label(model.eval(), image, scales=(1.0, 0.75), crf=crf, max_side=40)
    assert (label == expected).mean() > 0.99  # float rounding of the folded network may move a rare pixel
    # the CRF ran on the 30 x 40 probabilities: the labels are its nearest-neighbour enlargement
    from wsss.crf import dense_crf
    small_probs = predict_probs(model, image, scales=(1.0, 0.75), max_side=40, full_size=False)
    assert small_probs.shape == (2, 30, 40)
    import cv2
    small = dense_crf(cv2.resize(image, (40, 30), interpolation=cv2.INTER_AREA), small_probs,
                      **crf.kwargs()).argmax(0).astype(np.uint8)
    np.testing.assert_array_equal(expected, cv2.resize(small, (120, 90), interpolation=cv2.INTER_NEAREST))


def test_an_image_over_pils_size_limit_is_predicted(setup, tmp_path, monkeypatch):
    _, checkpoint, model = setup
    photo = tmp_path / "huge.png"
    image = np.random.default_rng(6).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    artifacts.write_image(photo, image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 2000 px is then "twice the limit": PIL refuses the header
    result = predict_images(checkpoint, tmp_path / "pred", photo)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(artifacts.read_label_png(artifacts.label_path(tmp_path / "pred", "huge")),
                                  predict_label(model.eval(), image, scales=(1.0, 0.75)))
