"""Tests of wsss/refine.py (one image) and stages/refine.py (``wsss refine``) on a tiny synthetic dataset."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wsss.stages.cli import cli
from wsss.stages.refine import RefineConfig, image_seed, run
from wsss import artifacts
from wsss.crf import CrfParams
from wsss.datasets.prepared import SplitSpec, write_prepared
from wsss.gmm import GmmParams
from wsss.refine import RefineParams, fit_split, image_thresholds, refine_image, split_samples

CLASSES = ["background", "cat", "dog"]
HEIGHT, WIDTH = 40, 56


# --------------------------------------------------------------------------- one image

def test_fixed_threshold_hand_worked():
    # two CAM planes (cat = 1, dog = 2) on a 2x3 image, ξ = 0.3
    cams = np.array([[[0.9, 0.2, 0.1], [0.5, 0.31, 0.0]],
                     [[0.1, 0.8, 0.2], [0.6, 0.0, 0.29]]], dtype=np.float32)
    label, reliability, info = refine_image(None, [1, 2], cams, RefineParams(threshold="fixed", bg_thresh=0.3))
    np.testing.assert_array_equal(label, [[1, 2, 0], [2, 1, 0]])
    assert label.dtype == np.uint8
    assert info["thresholds"] == [0.3] and info["fits"] == 0 and info["ignore_ratio"] == 0.0
    # RAW: fg d = (m-0.3)/0.7, bg d = (0.3-m)/0.3; P = -log(0.5 d); weights = (1/P) / mean(1/P)
    m = np.array([[0.9, 0.8, 0.2], [0.6, 0.31, 0.29]])
    fg = label != 0
    d = np.where(fg, (m - 0.3) / 0.7, (0.3 - m) / 0.3)
    reciprocal = 1.0 / -np.log(0.5 * d)
    np.testing.assert_allclose(reliability, reciprocal / reciprocal.mean(), rtol=1e-5)


def test_confident_regions_leave_255_between_the_thresholds():
    cams = np.array([[[0.9, 0.2, 0.04, 0.35]]], dtype=np.float32)
    params = RefineParams(threshold="fixed", bg_thresh=0.05, fg_thresh=0.3)
    label, reliability, info = refine_image(None, [2], cams, params)
    np.testing.assert_array_equal(label, [[2, 255, 0, 2]])
    assert reliability[0, 1] == 0.0 and info["thresholds"] == [0.05, 0.3]
    assert info["ignore_ratio"] == pytest.approx(0.25)


def _blob_cams(rng: np.random.Generator, centre=(20, 18), radius=11) -> tuple[np.ndarray, np.ndarray]:
    """One class CAM: ~0.8 inside a disc, ~0.1 outside, a soft rim, noise; returns (cams [1,H,W], disc mask)."""
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    distance = np.sqrt((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2)
    disc = distance <= radius
    cam = 0.1 + 0.7 / (1.0 + np.exp((distance - radius) / 1.0)) + rng.normal(0, 0.05, disc.shape)
    return np.clip(cam, 0, 1).astype(np.float32)[None], disc


# one image's own two-mode mixture (--threshold gmm-image --gmm-components 2 --gmm-overall)
IMAGE_GMM = RefineParams(threshold="gmm-image", gmm_per_class=False, gmm=GmmParams(components=2))


def test_gmm_threshold_segments_a_blob_and_marks_uncertain_pixels():
    rng = np.random.default_rng(0)
    cams, disc = _blob_cams(rng)
    label, reliability, info = refine_image(None, [1], cams, dataclasses.replace(IMAGE_GMM, confidence=0.0), seed=3)
    assert info["fits"] == 1 and info["fallbacks"] == []
    xi = info["thresholds"][0]
    assert 0.15 < xi < 0.6
    # without CRF and uncertainty the label is exactly the thresholded CAM
    np.testing.assert_array_equal(label, np.where(cams[0] >= np.float32(xi), 1, 0))
    assert (label[disc] == 1).mean() > 0.99
    assert info["ignore_ratio"] == 0.0

    strict, _, strict_info = refine_image(None, [1], cams, dataclasses.replace(IMAGE_GMM, confidence=0.99), seed=3)
    uncertain = strict == 255
    assert 0 < uncertain.sum() < uncertain.size * 0.5
    # the uncertain pixels are the scores of one interval around the threshold
    assert strict_info["thresholds"] == info["thresholds"]
    low, high = cams[0][uncertain].min(), cams[0][uncertain].max()
    assert low <= xi <= high
    certain = cams[0][~uncertain]
    assert not np.any((certain > low) & (certain < high))
    # labelled pixels keep the labels of the lenient run
    np.testing.assert_array_equal(strict[~uncertain], label[~uncertain])


def test_per_class_gmm_gives_one_threshold_per_class():
    rng = np.random.default_rng(1)
    first, disc1 = _blob_cams(rng, centre=(12, 12), radius=8)
    second, disc2 = _blob_cams(rng, centre=(28, 42), radius=9)
    cams = np.concatenate([first, second * 0.7])  # the dog CAM is weaker
    params = dataclasses.replace(IMAGE_GMM, gmm_per_class=True, confidence=0.0)
    label, _, info = refine_image(None, [1, 2], cams, params, seed=0)
    assert info["fits"] == 2 and len(info["thresholds"]) == 2
    assert info["thresholds"][1] < info["thresholds"][0]  # the weaker CAM gets a lower threshold
    assert (label[disc1] == 1).mean() > 0.97 and (label[disc2] == 2).mean() > 0.97


def test_pooled_fits_give_every_image_the_split_threshold_and_per_class_needs_enough_images():
    rng = np.random.default_rng(4)
    images = []
    for index in range(12):  # class 1 in every image, class 2 in the first three only
        first, _ = _blob_cams(rng, centre=(12 + index, 14), radius=8)
        keys = [1, 2] if index < 3 else [1]
        cams = np.concatenate([first, _blob_cams(rng, centre=(28, 40), radius=9)[0] * 0.6]) if index < 3 else first
        images.append((np.array(keys), cams))
    params = RefineParams(gmm=GmmParams(components=2), confidence=0.0, gmm_per_class=True)  # per class, pooled
    samples = [split_samples(keys, cams, params, 500, seed=index) for index, (keys, cams) in enumerate(images)]
    assert all(sample["all"].size <= 500 and (sample["all"] > 0.05).all() for sample in samples)
    fits = fit_split(samples, params, seed=0)
    # class 2 was seen in 3 images (< gmm_min_images = 10): it has no fit of its own and uses the overall one
    assert set(fits.per_class) == {1} and fits.for_class(2) is fits.overall
    assert fits.overall.fallback is None and 0.15 < fits.overall.threshold < 0.7
    first_label, _, first_info = refine_image(None, *images[0], params, split_fits=fits)
    _, _, other_info = refine_image(None, *images[5], params, split_fits=fits)
    assert first_info["thresholds"] == pytest.approx([fits.per_class[1].threshold, fits.overall.threshold], abs=1e-6)
    assert other_info["thresholds"] == pytest.approx([fits.per_class[1].threshold], abs=1e-6)
    # the split's fits are counted once by the stage, not once per image
    assert first_info["fits"] == 0 and first_info["fallbacks"] == []
    # the labels follow the per-class thresholds exactly (no CRF, no uncertainty)
    keys, cams = images[0]
    margins = cams - np.array(first_info["thresholds"], np.float32)[:, None, None]
    expected = np.where(margins.max(0) >= 0, np.array(keys)[margins.argmax(0)], 0)
    np.testing.assert_array_equal(first_label, expected)


def test_no_class_cam_is_background_and_counted():
    label, reliability, info = refine_image(None, [], np.zeros((0, 4, 5), np.float32), RefineParams())
    np.testing.assert_array_equal(label, np.zeros((4, 5), np.uint8))
    np.testing.assert_array_equal(reliability, np.ones((4, 5), np.float32))
    assert info["fallbacks"] == ["no_classes"] and info["fits"] == 1


def test_crf_follows_the_colour_edge():
    rng = np.random.default_rng(2)
    image = np.full((HEIGHT, WIDTH, 3), 200, dtype=np.uint8)
    image[:, :28] = (30, 40, 150)  # object on the left 28 columns
    cam = np.full((HEIGHT, WIDTH), 0.05, dtype=np.float32)
    cam[:, :22] = 0.9
    cam[:, 22:34] = 0.45  # the CAM fades out across the edge
    cams = np.clip(cam + rng.normal(0, 0.02, cam.shape), 0, 1).astype(np.float32)[None]
    params = RefineParams(threshold="fixed", bg_thresh=0.3, confidence=0.0)
    plain, _, _ = refine_image(image, [1], cams, params)
    assert (plain[:, 28:34] == 1).all()  # without the CRF the label overshoots the edge
    refined, _, _ = refine_image(image, [1], cams, RefineParams(threshold="fixed", bg_thresh=0.3, crf=CrfParams()))
    assert (refined[:, :28] == 1).mean() > 0.99 and (refined[:, 28:] == 0).mean() > 0.99


def test_params_are_checked():
    with pytest.raises(ValueError, match="fg_thresh"):
        RefineParams(threshold="gmm", fg_thresh=0.3)
    with pytest.raises(ValueError, match="fg_thresh"):
        RefineParams(threshold="fixed", bg_thresh=0.4, fg_thresh=0.3)
    with pytest.raises(ValueError, match="finite"):
        RefineParams(threshold="fixed", bg_thresh=0.3, unary_temperature=float("nan"))
    with pytest.raises(ValueError, match="pooled fits"):
        refine_image(None, [1], np.zeros((1, 4, 4), np.float32), RefineParams())  # gmm needs fit_split
    with pytest.raises(ValueError, match="image"):
        refine_image(None, [1], np.zeros((1, 4, 4), np.float32), RefineParams(crf=CrfParams()))
    for name in ("bg_thresh", "confidence", "unary_temperature", "lambda_alpha", "lambda_beta"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            RefineParams(**{name: float("nan")})
    with pytest.raises(ValueError, match="max_background_mean must be a finite number"):
        GmmParams(max_background_mean=float("inf"))


# --------------------------------------------------------------------------- the stage

IDS = ["a1", "b2", "c3", "d4", "e5"]


@pytest.fixture
def tiny(tmp_path):
    """A prepared 'folder' dataset of 5 images with masks, and a folder of CAMs made from the masks."""
    root, cam_dir = tmp_path / "data", tmp_path / "cams"
    rng = np.random.default_rng(0)
    labels = {}
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    for index, image_id in enumerate(IDS):
        cls = 1 + index % 2
        cy, cx, radius = 12 + 3 * index, 15 + 5 * index, 9 + index
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        image = np.full((HEIGHT, WIDTH, 3), (200, 190, 170), dtype=np.uint8)
        image[disc] = (40, 80, 150) if cls == 1 else (160, 40, 40)
        image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
        artifacts.write_image(root / "images" / f"{image_id}.png", image)
        artifacts.write_label_png(root / "masks" / f"{image_id}.png", np.where(disc, cls, 0).astype(np.uint8))
        # a blurry CAM: smooth bump that spills past the object
        bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (radius * 0.9) ** 2))
        cam = np.clip(bump + rng.normal(0, 0.02, bump.shape), 0, 1)
        artifacts.write_cam(artifacts.cam_path(cam_dir, image_id), np.array([cls]), cam[None] / cam.max())
        labels[image_id] = [cls]
    spec = SplitSpec(image_dir="images", image_ext=".png", mask_dir="masks")
    write_prepared(root, "folder", CLASSES, {"train": (spec, IDS)}, labels)
    return root, cam_dir, tmp_path


def _outputs(folder):
    return {image_id: (artifacts.label_path(folder, image_id).read_bytes(),
                       artifacts.reliability_path(folder, image_id).read_bytes()) for image_id in IDS}


def test_one_and_two_workers_give_identical_outputs(tiny):
    root, cam_dir, tmp = tiny
    params = RefineParams(crf=CrfParams(iterations=3))
    one = run(RefineConfig(cam_dir=cam_dir, root=root, out_dir=tmp / "w1", params=params, workers=1, progress=False))
    two = run(RefineConfig(cam_dir=cam_dir, root=root, out_dir=tmp / "w2", params=params, workers=2, progress=False))
    assert _outputs(tmp / "w1") == _outputs(tmp / "w2")
    assert one["threshold"] == two["threshold"] and one["refined"] == two["refined"] == len(IDS)
    assert one["workers"] == 1 and two["workers"] == 2


def test_two_shards_write_the_files_of_one_unsharded_run(tiny):
    root, cam_dir, tmp = tiny
    params = RefineParams(crf=CrfParams(iterations=3))
    run(RefineConfig(cam_dir=cam_dir, root=root, out_dir=tmp / "whole", params=params, workers=1, progress=False))
    done = [run(RefineConfig(cam_dir=cam_dir, root=root, out_dir=tmp / "sharded", params=params, workers=1,
                             shard=(index, 2), progress=False))["refined"] for index in (0, 1)]
    assert done == [3, 2]
    assert _outputs(tmp / "sharded") == _outputs(tmp / "whole")
    assert artifacts.metrics_path(tmp / "sharded", (1, 2)).is_file()


def test_stage_outputs_metrics_resume_and_eval(tiny):
    root, cam_dir, tmp = tiny
    out = tmp / "pseudo"
    cfg = RefineConfig(cam_dir=cam_dir, root=root, out_dir=out, params=RefineParams(confidence=0.0), evaluate=True,
                       workers=1, seed=4, progress=False)
    metrics = run(cfg)
    # the files re-opened from disk
    for image_id in IDS:
        label = artifacts.read_label_png(artifacts.label_path(out, image_id))
        weights = artifacts.read_reliability(artifacts.reliability_path(out, image_id))
        assert label.shape == weights.shape == (HEIGHT, WIDTH)
        assert np.load(artifacts.reliability_path(out, image_id)).dtype == np.float16
        assert set(np.unique(label)) <= {0, 1, 2, 255}
        assert weights[label != 255].mean() == pytest.approx(1.0, abs=1e-2)
    written = json.loads(artifacts.metrics_path(out).read_text())
    assert written["threshold"]["count"] == len(IDS)
    assert written["threshold"]["min"] <= written["threshold"]["median"] <= written["threshold"]["max"]
    assert set(written["fallbacks"]["by_reason"]) >= {"empty", "flat", "one_mode", "full_frame", "no_crossing"}
    assert written["eval"]["miou"] > 0.5 and written["eval"]["ignore_share"] == 0.0
    config = json.loads(artifacts.config_path(out).read_text())
    assert config["config"]["params"]["threshold"] == "gmm" and config["config"]["seed"] == 4

    # resume: nothing is redone, the statistics are the same, files untouched
    before = {image_id: artifacts.label_path(out, image_id).stat().st_mtime_ns for image_id in IDS}
    again = run(cfg)
    assert again["refined"] == 0 and again["skipped"] == len(IDS)
    assert again["threshold"] == metrics["threshold"] and again["ignore_ratio"] == metrics["ignore_ratio"]
    assert before == {image_id: artifacts.label_path(out, image_id).stat().st_mtime_ns for image_id in IDS}

    # a half-written image (reliability missing) is redone
    artifacts.reliability_path(out, "c3").unlink()
    assert run(cfg)["refined"] == 1

    # resuming with other settings is refused
    from wsss.errors import WsssError
    with pytest.raises(WsssError, match="other settings"):
        run(RefineConfig(cam_dir=cam_dir, root=root, out_dir=out, params=RefineParams(threshold="fixed"),
                         workers=1, progress=False))


def test_pseudo_labels_beat_the_cam_at_the_fixed_threshold(tiny):
    from wsss.datasets.prepared import PreparedDataset
    from wsss.evaluation import evaluate_cams

    root, cam_dir, tmp = tiny
    metrics = run(RefineConfig(cam_dir=cam_dir, root=root, out_dir=tmp / "crf", evaluate=True, workers=1,
                               params=RefineParams(crf=CrfParams(), confidence=0.0), progress=False))
    _, matrices = evaluate_cams(PreparedDataset.load(root), "train", cam_dir, [0.2], progress=False)
    assert metrics["eval"]["miou"] > matrices[0].miou()


def test_image_seed_depends_on_id_and_seed_only():
    assert image_seed(0, "a1") == image_seed(0, "a1")
    assert image_seed(0, "a1") != image_seed(0, "b2") and image_seed(0, "a1") != image_seed(1, "a1")


def test_thresholds_only_agree_with_refine(tiny):
    root, cam_dir, _ = tiny
    keys, cams = artifacts.read_cam(artifacts.cam_path(cam_dir, "b2"))
    _, _, info = refine_image(None, keys, cams, IMAGE_GMM, seed=9)
    assert image_thresholds(keys, cams, IMAGE_GMM, seed=9).reported == pytest.approx(info["thresholds"], abs=1e-6)


# --------------------------------------------------------------------------- command line

def test_cli_refine_with_crf_and_eval(tiny):
    root, cam_dir, tmp = tiny
    out = tmp / "cli"
    result = CliRunner().invoke(cli, ["-q", "refine", "--cams", str(cam_dir), "--root", str(root), "--out", str(out),
                                      "--crf", "--crf-iterations", "3", "--crf-scale", "0.5", "--workers", "1",
                                      "--eval"])
    assert result.exit_code == 0, result.output
    assert "pseudo-label mIoU" in result.output
    metrics = json.loads(artifacts.metrics_path(out).read_text())
    assert metrics["crf"] is True and metrics["refined"] == len(IDS)
    config = json.loads(artifacts.config_path(out).read_text())
    assert config["config"]["params"]["crf"]["scale"] == 0.5
    assert all(artifacts.label_path(out, image_id).is_file() for image_id in IDS)
    # the defaults: one mixture over classes and no band of unsure pixels (bench/threshold_choice.md); the band
    # of --confidence 0.9 marks the blurry CAMs' rims 255
    assert metrics["threshold"]["per_class"] is False and metrics["ignore_ratio"]["pixels"] == 0.0
    assert not any((artifacts.read_label_png(artifacts.label_path(out, i)) == 255).any() for i in IDS)
    banded = tmp / "banded"
    result = CliRunner().invoke(cli, ["-q", "refine", "--cams", str(cam_dir), "--root", str(root), "--out", str(banded),
                                      "--confidence", "0.9", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert all((artifacts.read_label_png(artifacts.label_path(banded, i)) == 255).any() for i in IDS)


def test_cli_errors_name_the_problem(tiny):
    root, cam_dir, tmp = tiny
    runner = CliRunner()
    base = ["refine", "--cams", str(cam_dir), "--root", str(root), "--workers", "1"]

    artifacts.cam_path(cam_dir, "d4").unlink()
    result = runner.invoke(cli, base + ["--out", str(tmp / "x")])
    assert result.exit_code == 1 and "Error:" in result.output and "d4.npz" in result.output
    assert "Traceback" not in result.output
    assert not (tmp / "x").exists()

    # an IRN-style pickled CAM needs --allow-pickle
    np.save(artifacts.irn_cam_path(cam_dir, "d4"),
            {"keys": np.array([0]), "high_res": np.zeros((1, HEIGHT, WIDTH), np.float32)}, allow_pickle=True)
    result = runner.invoke(cli, base + ["--out", str(tmp / "y")])
    assert result.exit_code == 1 and "--allow-pickle" in result.output and "d4.npy" in result.output
    result = runner.invoke(cli, base + ["--out", str(tmp / "y"), "--allow-pickle"])
    assert result.exit_code == 0, result.output

    result = runner.invoke(cli, base + ["--out", str(tmp / "z"), "--fg-thresh", "0.3"])
    assert result.exit_code == 2 and "--threshold fixed" in result.output
    result = runner.invoke(cli, base + ["--out", str(tmp / "z"), "--crf-bilateral", "50,5"])
    assert result.exit_code == 2 and "SXY,SRGB,COMPAT" in result.output
    result = runner.invoke(cli, base + ["--out", str(cam_dir)])
    assert result.exit_code == 1 and "--out must differ" in result.output


def test_pool_workers_stop_when_the_refine_process_is_killed(tmp_path):
    # 16 images of 320x320 with the CRF: each takes a worker a good fraction of a second
    root, cam_dir, out = tmp_path / "data", tmp_path / "cams", tmp_path / "out"
    rng = np.random.default_rng(1)
    ids = [f"k{index:02d}" for index in range(16)]
    yy, xx = np.mgrid[:320, :320]
    for image_id in ids:
        artifacts.write_image(root / "images" / f"{image_id}.png", rng.integers(0, 255, (320, 320, 3), np.uint8))
        cy, cx = rng.integers(80, 240, 2)
        cam = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 3000.0)
        artifacts.write_cam(artifacts.cam_path(cam_dir, image_id), np.array([1]), cam[None])
    write_prepared(root, "folder", CLASSES, {"train": (SplitSpec(image_dir="images", image_ext=".png"), ids)},
                   {image_id: [1] for image_id in ids})
    parent = subprocess.Popen([sys.executable, "-m", "wsss.stages.cli", "-q", "refine", "--cams", str(cam_dir), "--root",
                               str(root), "--out", str(out), "--crf", "--workers", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.png"))) < 1 and parent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    children = [int(pid) for pid in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()]
    assert parent.poll() is None and len(children) == 2, "refine finished before it could be killed"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    written = sorted(os.listdir(out))

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 3
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(alive(pid) for pid in children)
    time.sleep(0.3)
    # a worker without PR_SET_PDEATHSIG finished its image (and the rest of its chunk) and wrote it
    assert sorted(os.listdir(out)) == written
    assert len(list(out.glob("*.png"))) < len(ids)


def test_a_resume_with_other_settings_names_the_options():
    from wsss.stages.refine import _changed_options, _params_json

    fixed = _params_json(RefineParams(threshold="fixed"))
    gmm = _params_json(RefineParams(bg_thresh=0.3, gmm=GmmParams(fallback_threshold=0.3)))
    # before: the dataclass fields ("bg_thresh, gmm, threshold")
    assert _changed_options(fixed, gmm) == ["--bg-thresh", "--threshold"]
    assert _changed_options(fixed, _params_json(RefineParams(threshold="fixed", crf=CrfParams()))) == ["--crf"]
    assert _changed_options(_params_json(RefineParams(crf=CrfParams(iterations=3, bilateral_srgb=3.0))),
                            _params_json(RefineParams(crf=CrfParams(), lambda_beta=2.0))) == \
        ["--crf-bilateral", "--crf-iterations", "--raw-beta"]
