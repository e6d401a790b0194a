"""Tests of wsss/reliability.py: RAW perplexity and weights against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsss.reliability import (LAMBDA_ALPHA, LAMBDA_BETA, MIN_DISTANCE, perplexity, reliability_map,
                              reliability_weights, threshold_distance)


def test_defaults_keep_the_log_positive():
    assert 0 < LAMBDA_ALPHA < 1 and LAMBDA_BETA > 0
    assert LAMBDA_ALPHA * 1.0 < 1  # the largest argument of -log


def test_perplexity_hand_worked_pixels():
    # ξ = 0.4, λα = 0.5, λβ = 1
    # m = 0.8 (fg): d = (0.8-0.4)/0.6 = 2/3, P = -log(0.5 * 2/3) = -log(1/3) = 1.098612
    # m = 0.1 (bg): d = (0.4-0.1)/0.4 = 0.75, P = -log(0.375) = 0.980829
    # m = 1.0 (fg): d = 1, P = -log(0.5) = 0.693147
    # m = 0.4 (fg, on the threshold): d = 0 -> 1e-3, P = -log(5e-4) = 7.600902
    scores = np.array([0.8, 0.1, 1.0, 0.4])
    P = perplexity(scores, 0.4, lambda_alpha=0.5, lambda_beta=1.0)
    np.testing.assert_allclose(P, [1.098612, 0.980829, 0.693147, 7.600902], atol=1e-6)
    # λβ = 2 squares them; λα = 0.9: m = 0.8 -> -log(0.6) = 0.510826
    np.testing.assert_allclose(perplexity(scores, 0.4, lambda_alpha=0.5, lambda_beta=2.0),
                               [1.098612 ** 2, 0.980829 ** 2, 0.693147 ** 2, 7.600902 ** 2], rtol=1e-5)
    assert perplexity(np.array([0.8]), 0.4, lambda_alpha=0.9)[0] == pytest.approx(-math.log(0.6), abs=1e-9)


def test_branch_follows_the_label():
    # m = 0.3 < ξ = 0.4 but labelled foreground (moved by the CRF): distance clipped to the floor
    assert threshold_distance(np.array([0.3]), 0.4, np.array([True]))[0] == MIN_DISTANCE
    P = perplexity(np.array([0.3, 0.3]), 0.4, np.array([True, False]))
    assert P[0] == pytest.approx(-math.log(0.5 * MIN_DISTANCE))
    assert P[1] == pytest.approx(-math.log(0.5 * 0.25))  # background: d = 0.1/0.4


def test_weights_are_the_normalised_reciprocal():
    # perplexities 1, 2, 4 on labelled pixels and one ignore pixel:
    # reciprocal 1, 0.5, 0.25 (sum 1.75, mean 7/12); weights = reciprocal / mean = 12/7, 6/7, 3/7, and 0
    P = np.array([[1.0, 2.0], [4.0, 8.0]])
    labelled = np.array([[True, True], [True, False]])
    weights = reliability_weights(P, labelled)
    np.testing.assert_allclose(weights, [[12 / 7, 6 / 7], [3 / 7, 0.0]], rtol=1e-6)
    assert weights.dtype == np.float32
    assert weights[labelled].mean() == pytest.approx(1.0)
    np.testing.assert_array_equal(reliability_weights(P, np.zeros((2, 2), bool)), np.zeros((2, 2), np.float32))


def test_reliability_map_hand_worked():
    # 2x2: label 0 (bg, m=0.1), label 3 (fg, m=0.8), label 3 (fg, m=1.0), 255 (ignore)
    # P = 0.980829, 1.098612, 0.693147 -> reciprocal 1.019546, 0.910239, 1.442695 (mean 1.124160)
    score = np.array([[0.1, 0.8], [1.0, 0.45]])
    label = np.array([[0, 3], [3, 255]], dtype=np.uint8)
    weights = reliability_map(score, 0.4, label)
    reciprocal = np.array([1 / 0.980829, 1 / 1.098612, 1 / 0.693147])
    expected = reciprocal / reciprocal.mean()
    np.testing.assert_allclose(weights[[0, 0, 1], [0, 1, 0]], expected, rtol=1e-5)
    assert weights[1, 1] == 0.0
    # the most confident pixel weighs most
    assert weights[1, 0] > weights[0, 0] > weights[0, 1]


def test_bad_lambdas_raise():
    with pytest.raises(ValueError, match="lambda_alpha"):
        perplexity(np.array([0.5]), 0.4, lambda_alpha=1.0)
    with pytest.raises(ValueError, match="lambda_beta"):
        perplexity(np.array([0.5]), 0.4, lambda_beta=0.0)


def test_values_stay_finite_at_the_extremes():
    scores = np.array([0.0, 0.2, 0.4, 1.0])
    for threshold in (1e-9, 0.4, 1 - 1e-9):
        P = perplexity(scores, threshold)
        assert np.all(np.isfinite(P)) and np.all(P > 0)
