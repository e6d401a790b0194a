"""Tests of wsss/crf.py: the dense CRF snaps a noisy boundary onto a colour edge."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from wsss.crf import CrfParams, dense_crf

HEIGHT, WIDTH, EDGE = 40, 64, 32  # the colour edge lies between columns 31 and 32


def _toy():
    """Dark object on the left, bright background on the right; the CAM overshoots the edge by 8 columns."""
    rng = np.random.default_rng(0)
    image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    image[:, :EDGE] = (40, 60, 160)
    image[:, EDGE:] = (220, 200, 90)
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    foreground = np.full((HEIGHT, WIDTH), 0.2, dtype=np.float32)
    foreground[:, :EDGE - 6] = 0.8          # confidently object
    foreground[:, EDGE - 6:EDGE + 8] = 0.56  # weakly object, and wrong right of the edge
    foreground = np.clip(foreground + rng.normal(0, 0.03, foreground.shape), 0.01, 0.99).astype(np.float32)
    probs = np.stack([1.0 - foreground, foreground])
    truth = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
    truth[:, :EDGE] = 1
    return image, probs, truth


def test_crf_moves_the_boundary_onto_the_colour_edge():
    image, probs, truth = _toy()
    before = probs.argmax(0)
    # the input is wrong on the 8 columns right of the edge
    assert (before != truth).mean() > 0.1
    posterior = dense_crf(image, probs)
    after = posterior.argmax(0)
    assert (after != truth).mean() < 0.01
    # the boundary of every row sits at the edge
    assert np.all(after[:, EDGE - 1] == 1) and np.all(after[:, EDGE] == 0)


def test_posterior_shape_dtype_and_normalisation():
    image, probs, _ = _toy()
    posterior = dense_crf(image, probs, iterations=3)
    assert posterior.shape == probs.shape and posterior.dtype == np.float32
    np.testing.assert_allclose(posterior.sum(0), 1.0, atol=1e-4)


def test_reduced_resolution_gives_nearly_the_same_labels():
    image, probs, truth = _toy()
    half = dense_crf(image, probs, scale=0.5)
    assert half.shape == probs.shape
    np.testing.assert_allclose(half.sum(0), 1.0, atol=1e-4)
    assert (half.argmax(0) != truth).mean() < 0.05


def test_without_pairwise_terms_the_labels_stay():
    image, probs, _ = _toy()
    posterior = dense_crf(image, probs, gaussian_compat=0, bilateral_compat=0)
    np.testing.assert_array_equal(posterior.argmax(0), probs.argmax(0))


def _island():
    """A flat grey 24 x 24 image whose class-1 probability is 0.3, except a 2 x 2 island of 0.6."""
    image = np.full((24, 24, 3), 128, dtype=np.uint8)
    foreground = np.full((24, 24), 0.3, dtype=np.float32)
    foreground[10:12, 10:12] = 0.6
    return image, np.stack([1.0 - foreground, foreground])


def test_gaussian_kernel_width_and_weight_decide_whether_an_island_is_smoothed_away():
    """--crf-gaussian-sxy is how far the smoothness kernel reaches (pixels), --crf-gaussian-compat its weight."""
    image, probs = _island()

    def island_kept(sxy, compat):
        posterior = dense_crf(image, probs, iterations=5, gaussian_sxy=sxy, gaussian_compat=compat, bilateral_compat=0)
        return bool((posterior.argmax(0)[10:12, 10:12] == 1).all())

    # weight 0: no pairwise term, the posterior is the input itself (its unary is -log p)
    unary_only = dense_crf(image, probs, iterations=5, gaussian_compat=0, bilateral_compat=0)
    np.testing.assert_allclose(unary_only, probs, atol=1e-5)
    assert island_kept(sxy=3.0, compat=0.0)
    assert not island_kept(sxy=3.0, compat=3.0)  # 3 pixels wide and weight 3: the surroundings outvote it
    assert island_kept(sxy=0.5, compat=3.0)      # narrower than the pixel spacing: no neighbour is reached
    assert island_kept(sxy=1.0, compat=1.0) and not island_kept(sxy=1.0, compat=3.0)  # the weight decides


def test_crf_label_uses_the_settings_it_is_given():
    from wsss.crf import crf_label

    image, probs = _island()
    smooth = CrfParams(iterations=5, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_compat=0.0)
    np.testing.assert_array_equal(crf_label(image, probs, smooth), np.zeros((24, 24), np.uint8))
    narrow = smooth.replace(gaussian_sxy=0.5)
    np.testing.assert_array_equal(crf_label(image, probs, narrow), probs.argmax(0))


def test_single_class_is_certain():
    image, probs, _ = _toy()
    np.testing.assert_array_equal(dense_crf(image, probs[:1] * 0 + 1), np.ones((1, HEIGHT, WIDTH), np.float32))


def test_bad_inputs_raise():
    image, probs, _ = _toy()
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), probs)
    with pytest.raises(ValueError, match="probs"):
        dense_crf(image, probs[:, :10])
    with pytest.raises(ValueError, match="scale"):
        dense_crf(image, probs, scale=1.5)
    with pytest.raises(ValueError, match="iterations"):
        CrfParams(iterations=0)
    with pytest.raises(ValueError, match="NaN"):
        dense_crf(image, np.full_like(probs, np.nan))


@pytest.mark.parametrize("name", ["gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb",
                                  "bilateral_compat", "scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_settings_raise_instead_of_crashing_pydensecrf(name, value):
    # NaN passed every `x <= 0` test, and pydensecrf then died with a segmentation fault
    with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} .*: must be a finite number"):
        CrfParams(**{name: value})
    image, probs, _ = _toy()
    with pytest.raises(ValueError, match=name.replace('_', '-')):
        dense_crf(image, probs, **{name: value})


def test_params_defaults_match_the_function_defaults():
    signature = inspect.signature(dense_crf)
    for name, value in CrfParams().kwargs().items():
        assert signature.parameters[name].default == value, name
    assert CrfParams().bilateral_sxy == 50 and CrfParams().bilateral_srgb == 5 and CrfParams().bilateral_compat == 10
