"""Tests of wsss/refine.py: one image's thresholds, label and reliability; pooled fits; confident regions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from wsss.crf import CrfParams
from wsss.gmm import GmmFit, GmmParams, GmmThreshold
from wsss.refine import (RefineParams, SplitFits, confident_label, confident_thresholds, fit_split, image_seed,
                         image_thresholds, refine_image, split_samples)
from wsss.settings import SettingError

HEIGHT, WIDTH = 40, 56


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


def test_crf_temperature_scales_the_unary_margins_by_hand(monkeypatch):
    """--crf-temperature T: the CRF's input is softmax([0, cam - threshold] / T) per pixel."""
    import wsss.refine
    from wsss.refine import label_from_thresholds

    seen = []
    monkeypatch.setattr(wsss.refine, "dense_crf", lambda image, probs, **settings: seen.append(probs) or probs)
    cams = np.array([[[0.7, 0.1]]], dtype=np.float32)  # margins 0.5 and -0.1 from the threshold 0.2
    image = np.zeros((1, 2, 3), np.uint8)
    for temperature in (1.0, 0.25):
        label = label_from_thresholds(cams, np.array([0.2]), image=image, crf=CrfParams(),
                                      unary_temperature=temperature)
        assert label.tolist() == [[1, 0]]
    # T = 1: sigmoid(0.5) = 0.622459, sigmoid(-0.1) = 0.475021; T = 1/4: sigmoid(2) = 0.880797, sigmoid(-0.4) = 0.401312
    np.testing.assert_allclose(seen[0][1], [[0.622459, 0.475021]], atol=1e-6)
    np.testing.assert_allclose(seen[1][1], [[0.880797, 0.401312]], atol=1e-6)
    np.testing.assert_allclose(seen[1][0] + seen[1][1], 1.0, atol=1e-6)


def test_refine_image_runs_the_crf_with_its_settings_and_weighs_with_its_alpha(monkeypatch):
    """The CRF group (--crf-gaussian-sxy/-compat ...) and --raw-alpha of RefineParams reach dense_crf and the RAW
    weights of one image."""
    import wsss.refine
    from wsss.reliability import reliability_map

    seen = []
    monkeypatch.setattr(wsss.refine, "dense_crf", lambda image, probs, **settings: seen.append(settings) or probs)
    cams = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(1, 3, 4)
    crf = CrfParams(iterations=2, gaussian_sxy=7.0, gaussian_compat=9.0)
    params = RefineParams(threshold="fixed", bg_thresh=0.3, crf=crf, lambda_alpha=0.8)
    label, weights, _ = refine_image(np.zeros((3, 4, 3), np.uint8), [2], cams, params)
    assert seen == [crf.kwargs()]
    np.testing.assert_array_equal(label, np.where(cams[0] > 0.3, 2, 0))
    np.testing.assert_allclose(weights, reliability_map(cams[0], 0.3, label, lambda_alpha=0.8), rtol=1e-6)
    assert not np.allclose(weights, reliability_map(cams[0], 0.3, label, lambda_alpha=0.5))


def test_params_are_checked():
    with pytest.raises(ValueError, match="--fg-thresh 0.3: needs --threshold fixed"):
        RefineParams(threshold="gmm", fg_thresh=0.3)
    with pytest.raises(ValueError, match="--fg-thresh 0.3: must not be below --bg-thresh 0.4"):
        RefineParams(threshold="fixed", bg_thresh=0.4, fg_thresh=0.3)
    with pytest.raises(SettingError, match="--threshold 'otsu': choose from gmm, gmm-image, fixed"):
        RefineParams(threshold="otsu")
    with pytest.raises(ValueError, match="--bg-thresh 1: must be < 1"):
        RefineParams(bg_thresh=1.0)
    with pytest.raises(ValueError, match="pooled fits"):
        refine_image(None, [1], np.zeros((1, 4, 4), np.float32), RefineParams())  # gmm needs fit_split
    with pytest.raises(ValueError, match="image"):
        refine_image(None, [1], np.zeros((1, 4, 4), np.float32), RefineParams(crf=CrfParams()))
    for name in ("bg_thresh", "confidence", "unary_temperature", "lambda_alpha", "lambda_beta"):
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} nan: must be a finite number"):
            RefineParams(**{name: float("nan")})
    with pytest.raises(ValueError, match="--max-background-mean inf: must be a finite number"):
        GmmParams(max_background_mean=float("inf"))


def test_thresholds_only_agree_with_refine():
    cams, _ = _blob_cams(np.random.default_rng(5), centre=(22, 30), radius=10)
    _, _, info = refine_image(None, [2], cams, IMAGE_GMM, seed=9)
    assert image_thresholds([2], cams, IMAGE_GMM, seed=9).reported == pytest.approx(info["thresholds"], abs=1e-6)


def test_image_seed_depends_on_id_and_seed_only():
    assert image_seed(0, "a1") == image_seed(0, "a1")
    assert image_seed(0, "a1") != image_seed(0, "b2") and image_seed(0, "a1") != image_seed(1, "a1")


# --------------------------------------------------------------------------- confident regions

def test_confident_label_by_hand():
    cams = np.array([[[0.9, 0.5, 0.1, 0.0],
                      [0.8, 0.2, 0.04, 0.0]],
                     [[0.1, 0.6, 0.7, 0.2],
                      [0.0, 0.1, 0.02, 0.03]]], np.float32)
    # class 3 above 0.8, class 5 above 0.65; background where every CAM is below 0.05; 255 between
    label = confident_label(None, [3, 5], cams, fg_thresholds=[0.8, 0.65], bg_thresholds=[0.05, 0.05])
    expected = np.array([[3, 255, 5, 255],
                         [3, 255, 0, 0]], np.uint8)
    np.testing.assert_array_equal(label, expected)
    assert confident_label(None, [], np.zeros((0, 2, 4), np.float32), [], []).tolist() == [[0] * 4] * 2


def test_confident_thresholds_by_hand():
    assert confident_thresholds(None, 0.3, 0.05) == {"fg": 0.3, "bg": 0.05}
    # the two lowest components have equal weights and widths: they cross half-way between their means, at 0.1
    three = GmmFit(weights=(0.4, 0.4, 0.2), means=(0.0, 0.2, 0.7), stds=(0.05, 0.05, 0.1))
    overall = GmmThreshold(0.5, three, None)
    fits = SplitFits(overall, {1: GmmThreshold(0.6, None, None), 2: GmmThreshold(0.2, None, "flat")})
    # class 2's own fit fell back: it takes the overall threshold
    assert confident_thresholds(fits, 0.3, 0.05) == {"fg": {1: 0.6, 2: 0.5, "default": 0.5},
                                                     "bg": pytest.approx(0.1, abs=1e-9)}
    # two components: no lower pair of their own, the low threshold is half the overall one
    two = SplitFits(GmmThreshold(0.5, GmmFit((0.5, 0.5), (0.1, 0.7), (0.1, 0.1)), None), {})
    assert confident_thresholds(two, 0.3, 0.05) == {"fg": {"default": 0.5}, "bg": 0.25}
    # the low threshold never exceeds a class's high one
    low_class = SplitFits(overall, {1: GmmThreshold(0.08, None, None)})
    assert confident_thresholds(low_class, 0.3, 0.05)["bg"] == pytest.approx(0.08)
