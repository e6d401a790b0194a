"""Tests of wsss/gmm.py: the closed-form crossing, the fitted threshold and the degenerate-case rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from wsss import gmm
from wsss.gmm import GmmFit, GmmParams, GmmThreshold, gaussian_crossing, gmm_threshold, no_class_threshold


def _numeric_crossing(weights, means, stds) -> float:
    """Independent check: the root of w0 N0 - w1 N1 between the means, by bisection."""
    def difference(x):
        return weights[0] * norm.pdf(x, means[0], stds[0]) - weights[1] * norm.pdf(x, means[1], stds[1])
    return brentq(difference, means[0], means[1], xtol=1e-12)


TWO = GmmParams(components=2)  # the classic two-mode split, whose boundary has a closed-form check


def _mixture(rng, n, weights, means, stds) -> np.ndarray:
    high = rng.random(n) < weights[1]
    return np.where(high, rng.normal(means[1], stds[1], n), rng.normal(means[0], stds[0], n))


def test_crossing_equal_variances_hand_worked():
    # equal σ: the quadratic term vanishes, x = (μ0 + μ1)/2 + σ² log(w0/w1) / (μ1 − μ0)
    assert gaussian_crossing((0.5, 0.5), (0.2, 0.6), (0.1, 0.1)) == pytest.approx(0.4, abs=1e-12)
    expected = 0.4 + 0.01 * math.log(3.0) / 0.4  # = 0.427465...
    assert gaussian_crossing((0.75, 0.25), (0.2, 0.6), (0.1, 0.1)) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.427465, abs=1e-6)


@pytest.mark.parametrize("weights, means, stds", [
    ((0.7, 0.3), (0.25, 0.65), (0.07, 0.12)),
    ((0.4, 0.6), (0.15, 0.70), (0.10, 0.05)),
    ((0.9, 0.1), (0.10, 0.80), (0.05, 0.15)),
])
def test_crossing_matches_numeric_root(weights, means, stds):
    assert gaussian_crossing(weights, means, stds) == pytest.approx(_numeric_crossing(weights, means, stds), abs=1e-9)


def test_no_crossing_between_the_means():
    # a heavy broad component dominates even at the light narrow one's mean
    weights, means, stds = (0.99, 0.01), (0.3, 0.4), (0.2, 0.02)
    assert weights[0] * norm.pdf(0.4, 0.3, 0.2) > weights[1] * norm.pdf(0.4, 0.4, 0.02)
    assert gaussian_crossing(weights, means, stds) is None
    assert gaussian_crossing((0.5, 0.5), (0.6, 0.2), (0.1, 0.1)) is None  # means out of order


@pytest.mark.parametrize("seed, weights, means, stds", [
    (0, (0.7, 0.3), (0.25, 0.65), (0.07, 0.12)),
    (1, (0.5, 0.5), (0.20, 0.75), (0.08, 0.10)),
    (2, (0.8, 0.2), (0.15, 0.60), (0.05, 0.15)),
])
def test_fitted_threshold_is_within_002_of_the_analytic_crossing(seed, weights, means, stds):
    rng = np.random.default_rng(100 + seed)
    scores = _mixture(rng, 60_000, weights, means, stds).reshape(200, 300)
    analytic = _numeric_crossing(weights, means, stds)
    result = gmm_threshold(scores, TWO, seed=seed)
    assert result.fallback is None
    assert abs(result.threshold - analytic) < 0.02
    assert result.fit.means[0] == pytest.approx(means[0], abs=0.02)
    assert result.fit.means[1] == pytest.approx(means[1], abs=0.03)


def test_same_seed_same_threshold_and_subsample_is_bounded(monkeypatch):
    rng = np.random.default_rng(5)
    scores = _mixture(rng, 50_000, (0.6, 0.4), (0.2, 0.7), (0.08, 0.1))
    first = gmm_threshold(scores, seed=7)
    assert gmm_threshold(scores, seed=7) == first
    seen = []
    original = gmm.fit_mixture

    def spy(samples, *args, **kwargs):
        seen.append(np.asarray(samples).size)
        return original(samples, *args, **kwargs)

    monkeypatch.setattr(gmm, "fit_mixture", spy)
    gmm_threshold(scores, GmmParams(max_samples=2_000), seed=7)
    assert seen == [2_000]


def test_posterior_is_half_at_the_crossing_and_clipped_beyond_the_means():
    fit = GmmFit(weights=(0.5, 0.5), means=(0.2, 0.6), stds=(0.1, 0.1))
    posterior = fit.foreground_posterior(np.array([0.0, 0.2, 0.4, 0.6, 1.0]))
    assert posterior[2] == pytest.approx(0.5, abs=1e-6)
    # beyond a mean the posterior is that of the mean itself
    assert posterior[0] == posterior[1] and posterior[3] == posterior[4]
    # at μ1 = 0.6: ratio of densities exp(-(0.4/0.1)²/2) = exp(-8): posterior = 1/(1 + e^-8)
    assert posterior[3] == pytest.approx(1.0 / (1.0 + math.exp(-8.0)), abs=1e-6)
    result = GmmThreshold(0.4, fit, None)
    confidence = result.confidence(np.array([0.2, 0.4, 0.6]))
    np.testing.assert_allclose(confidence, [1.0 / (1.0 + math.exp(-8.0)), 0.5, 1.0 / (1.0 + math.exp(-8.0))], atol=1e-6)


# --------------------------------------------------------------------------- degenerate cases

FALLBACK = GmmParams(fallback_threshold=0.17, components=2)


def _assert_fallback(result: GmmThreshold, reason: str) -> None:
    assert result.fallback == reason
    assert result.threshold == pytest.approx(0.17)
    # a fallback marks nothing uncertain
    np.testing.assert_array_equal(result.confidence(np.linspace(0, 1, 11)), np.ones(11, dtype=np.float32))


def test_no_classes():
    _assert_fallback(no_class_threshold(FALLBACK), "no_classes")


def test_empty_cam():
    scores = np.zeros((40, 40), dtype=np.float32)
    scores[0, :10] = 0.9  # 10 pixels above min_score < min_samples (50)
    _assert_fallback(gmm_threshold(scores, FALLBACK), "empty")


def test_flat_cam():
    _assert_fallback(gmm_threshold(np.full((40, 40), 0.5, dtype=np.float32), FALLBACK), "flat")


def test_one_mode():
    rng = np.random.default_rng(0)
    scores = rng.normal(0.3, 0.05, size=(100, 100))
    _assert_fallback(gmm_threshold(scores, FALLBACK, seed=0), "one_mode")


def test_object_filling_the_frame():
    rng = np.random.default_rng(1)
    # two clear modes, both object: 0.6 and 0.9
    scores = _mixture(rng, 20_000, (0.5, 0.5), (0.6, 0.9), (0.04, 0.04))
    result = gmm_threshold(scores, FALLBACK, seed=0)
    _assert_fallback(result, "full_frame")
    assert result.fit.means[0] == pytest.approx(0.6, abs=0.02)


def test_no_crossing_falls_back(monkeypatch):
    fit = GmmFit(weights=(0.99, 0.01), means=(0.3, 0.4), stds=(0.2, 0.02))
    monkeypatch.setattr(gmm, "fit_mixture", lambda samples, components, **kwargs: (fit, -100.0, 0.0))
    scores = np.random.default_rng(2).random((30, 30))
    _assert_fallback(gmm_threshold(scores, FALLBACK), "no_crossing")


def test_spike_of_zeros_does_not_pull_the_threshold_to_zero():
    rng = np.random.default_rng(3)
    scores = np.zeros(100_000)
    scores[:20_000] = rng.uniform(0.5, 1.0, 20_000)             # object
    scores[20_000:40_000] = np.clip(rng.exponential(0.05, 20_000), 0, 1)  # background haze; the rest is exact 0
    # two clear modes (haze, object): the two-component split.  Three components would cut this flat
    # object mode in two (threshold 0.79): the README tells when to use --gmm-components 2.
    result = gmm_threshold(scores, TWO, seed=0)
    assert result.fallback is None
    assert 0.15 < result.threshold < 0.45


def test_params_are_checked():
    with pytest.raises(ValueError, match="--fallback-threshold 1.5: must be <= 1"):
        GmmParams(fallback_threshold=1.5)
    with pytest.raises(ValueError, match="--reg-covar 0: must be > 0"):
        GmmParams(reg_covar=0.0)
    with pytest.raises(ValueError, match="--components 1: must be >= 2"):
        GmmParams(components=1)


# --------------------------------------------------------------------------- real CAM histograms

# Histograms (per 0.05 bin, in thousandths of all pixels) of the max-over-classes CAM score of the
# ground-truth foreground and background pixels, measured on the CAMs of the demo pipeline
# (plain ResNet-18 classifier, 120 train images): 11 % foreground with a rising density; background
# 42 % at about 0 and a long falling tail that covers all of [0, 1].
DEMO_FOREGROUND = np.array([4, 2, 2, 2, 2, 3, 3, 3, 4, 5, 5, 6, 7, 7, 8, 9, 10, 10, 10, 7], float)
DEMO_BACKGROUND = np.array([377, 72, 53, 45, 41, 40, 37, 35, 32, 29, 25, 22, 19, 15, 13, 11, 9, 8, 6, 3], float)
EDGES = np.linspace(0.0, 1.0, 21)


def _draw(histogram: np.ndarray, n: int, rng) -> np.ndarray:
    """Scores from a piecewise-uniform density with these bin masses."""
    bins = rng.choice(len(histogram), size=n, p=histogram / histogram.sum())
    return EDGES[bins] + rng.random(n) * (EDGES[1] - EDGES[0])


def _cdf(histogram: np.ndarray, t: float) -> float:
    inside = np.clip((t - EDGES[:-1]) / (EDGES[1] - EDGES[0]), 0.0, 1.0)
    return float((histogram / histogram.sum() * inside).sum())


def _best_miou_threshold(foreground: np.ndarray, background: np.ndarray) -> float:
    """The threshold with the best mean of foreground and background IoU, from the exact distributions."""
    share = foreground.sum() / (foreground.sum() + background.sum())
    best, best_t = -1.0, None
    for t in np.linspace(0.01, 0.99, 981):
        tp, fn = share * (1 - _cdf(foreground, t)), share * _cdf(foreground, t)
        fp = (1 - share) * (1 - _cdf(background, t))
        tn = (1 - share) - fp
        miou = 0.5 * (tp / (tp + fn + fp) + tn / (tn + fn + fp))
        if miou > best:
            best, best_t = miou, t
    return best_t


@pytest.mark.parametrize("seed", [0, 1])
def test_pooled_default_threshold_lands_near_the_best_on_real_cam_histograms(seed):
    rng = np.random.default_rng(seed)
    share = DEMO_FOREGROUND.sum() / (DEMO_FOREGROUND.sum() + DEMO_BACKGROUND.sum())
    n = 200_000
    scores = np.concatenate([_draw(DEMO_FOREGROUND, int(n * share), rng),
                             _draw(DEMO_BACKGROUND, n - int(n * share), rng)])
    best = _best_miou_threshold(DEMO_FOREGROUND, DEMO_BACKGROUND)
    assert best == pytest.approx(0.65, abs=0.01)
    result = gmm_threshold(scores, GmmParams(), seed=seed)  # four components: the default
    assert result.fallback is None and len(result.fit.means) == 4
    # measured: 0.647 against 0.65; CoSA's three components stop at 0.59 and the two-component split of the
    # same scores lands far too low (the toolkit's first behaviour)
    assert abs(result.threshold - best) < 0.02
    three = gmm_threshold(scores, GmmParams(components=3), seed=seed)
    assert 0.03 < best - three.threshold < 0.08
    two = gmm_threshold(scores, TWO, seed=seed)
    assert best - two.threshold > 0.15


def test_three_component_posterior_is_the_top_against_every_component_below():
    fit = GmmFit(weights=(0.4, 0.3, 0.3), means=(0.1, 0.3, 0.7), stds=(0.05, 0.1, 0.1))
    # equal weights and widths of the upper pair: the boundary is the midpoint of their means
    assert fit.crossing() == pytest.approx(0.5, abs=1e-9)
    posterior = fit.foreground_posterior(np.array([0.0, 0.1, 0.3, 0.5, 0.7, 1.0]))
    assert posterior[3] == pytest.approx(0.5, abs=1e-6)  # the lowest component's density there is e^-30 of theirs
    assert posterior[0] == posterior[1] and posterior[4] == posterior[5]  # clipped to [0.1, 0.7]
    # w/σ is 8 (lowest) and 3 (middle, top); at x = 0.3 the top is 4 σ away, the lowest 4 σ, the middle 0:
    # 3e^-8 / (3e^-8 + 3 + 8e^-8)
    assert posterior[2] == pytest.approx(3 * math.exp(-8) / (3 + 11 * math.exp(-8)), rel=1e-5)
    # at x = 0.1 the top is 6 σ away, the middle 2 σ, the lowest 0: 3e^-18 / (3e^-18 + 3e^-2 + 8)
    assert posterior[1] == pytest.approx(3 * math.exp(-18) / (3 * math.exp(-18) + 3 * math.exp(-2) + 8), rel=1e-5)
    assert posterior[4] == pytest.approx(1.0 / (1.0 + math.exp(-8.0) + 8 / 3 * math.exp(-72)), abs=1e-6)


def test_a_score_on_the_lowest_component_is_sure_background_with_four_components():
    # the pooled fit of the parts style's plain CAMs (seed 1): the top pair overlaps, so against the component
    # below the top alone, every score under its mean 0.256 had confidence 0.896 and --confidence 0.9 made 93 %
    # of the pixels 255
    fit = GmmFit(weights=(0.296484, 0.239367, 0.262724, 0.201425), means=(0.076375, 0.135163, 0.256024, 0.546047),
                 stds=(0.021834, 0.043039, 0.088191, 0.197214))
    confidence = GmmThreshold(fit.crossing(), fit, None).confidence(np.array([0.0, 0.05, 0.14, fit.crossing()]))
    assert confidence[0] == confidence[1] > 0.995 and confidence[2] > 0.98  # (0.896 and 0.896 before)
    assert 0.5 <= confidence[3] < 0.51
    # confidence falls towards the threshold
    scores = np.linspace(0.07, fit.crossing(), 50)
    assert np.all(np.diff(GmmThreshold(fit.crossing(), fit, None).confidence(scores)) <= 1e-6)
