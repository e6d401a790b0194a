"""Reliability-based adaptive weighting (RAW): per-pixel weights for training on pseudo-labels.

A pseudo-label is least trustworthy where the CAM score ``m`` is close to the
threshold ξ that decided it, and most trustworthy far from it.  RAW (the
reliability weighting of CoSA, Yang et al. 2024) turns the normalised distance to
the threshold into a perplexity

    P = [−log(λα (m − ξ) / (1 − ξ))]^λβ    if the pixel is foreground (m >= ξ),
    P = [−log(λα (ξ − m) / ξ)]^λβ          if it is background (m < ξ),

and the weight is the reciprocal 1/P, normalised so that the mean weight over
the labelled (non-ignore) pixels of the image is 1; ignore pixels get weight 0.

Choices and why:

* ``λα`` (``LAMBDA_ALPHA = 0.5``) must lie in (0, 1): the normalised distance d is
  in [0, 1], and −log(λα d) is positive only while λα d < 1.  With 0.5 the most
  confident pixel (d = 1) has P = log 2 ≈ 0.69 and the weights span about one
  order of magnitude; λα -> 1 would give the few most confident pixels unbounded
  weight (P -> 0).
* ``λβ`` (``LAMBDA_BETA = 1.0``, CoSA's ``camweight_beta`` default) sharpens (> 1)
  or flattens (< 1) the spread of weights.
* d is clipped to [``MIN_DISTANCE`` = 1e-3, 1], so λα d stays in
  [λα·1e-3, λα] ⊂ (0, 1): a pixel exactly on the threshold gets a large but finite
  perplexity (−log(5e-4) ≈ 7.6) instead of infinity.
* The branch follows the *label*, not the score: after the CRF a pixel can be
  foreground although m < ξ (or the other way round).  Its distance on the
  side of its label is then negative, is clipped to ``MIN_DISTANCE`` and the pixel
  gets the smallest weight, which is what a label that contradicts its CAM deserves.
  Where label and score agree this is exactly the formula above.
"""

from __future__ import annotations

import numpy as np

from wsss.artifacts import IGNORE_INDEX

LAMBDA_ALPHA = 0.5
LAMBDA_BETA = 1.0
MIN_DISTANCE = 1e-3


def _check(alpha: float, beta: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"lambda_alpha must lie in (0, 1) so that -log(lambda_alpha * d) > 0, got {alpha}")
    if beta <= 0.0:
        raise ValueError(f"lambda_beta must be positive, got {beta}")


def threshold_distance(score: np.ndarray, threshold: np.ndarray | float, foreground: np.ndarray | bool) -> np.ndarray:
    """Return the normalised distance d in [MIN_DISTANCE, 1] of each score from its threshold.

    Args:
        score: float [...] CAM score m in [0, 1].
        threshold: ξ in (0, 1), scalar or broadcastable to ``score``.
        foreground: bool [...] (or scalar), which side of the threshold the pixel is labelled on.

    Returns:
        float64 [...]: (m − ξ)/(1 − ξ) for foreground, (ξ − m)/ξ for background, clipped.
    """
    m = np.asarray(score, dtype=np.float64)
    xi = np.clip(np.asarray(threshold, dtype=np.float64), 1e-6, 1 - 1e-6)
    distance = np.where(foreground, (m - xi) / (1.0 - xi), (xi - m) / xi)
    return np.clip(distance, MIN_DISTANCE, 1.0)


def perplexity(score: np.ndarray, threshold: np.ndarray | float, foreground: np.ndarray | bool | None = None, *,
               lambda_alpha: float = LAMBDA_ALPHA, lambda_beta: float = LAMBDA_BETA) -> np.ndarray:
    """Return the RAW perplexity P per pixel (see the module docstring).

    Args:
        score: float [...] top CAM score m.
        threshold: ξ, scalar or broadcastable.
        foreground: bool [...] label side; None uses ``score >= threshold`` (the plain formula).

    Returns:
        float64 [...] perplexity, in [(−log λα)^λβ, (−log(λα·MIN_DISTANCE))^λβ].
    """
    _check(lambda_alpha, lambda_beta)
    if foreground is None:
        foreground = np.asarray(score) >= np.asarray(threshold)
    distance = threshold_distance(score, threshold, foreground)
    return (-np.log(lambda_alpha * distance)) ** lambda_beta


def reliability_weights(perplexities: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    """Turn perplexities into weights: 1/P normalised to mean 1 over labelled pixels, 0 elsewhere.

    Args:
        perplexities: float [H, W] (positive).
        labelled: bool [H, W], False for ignore (255) pixels.

    Returns:
        float32 [H, W]; all zeros when no pixel is labelled.
    """
    labelled = np.asarray(labelled, dtype=bool)
    reciprocal = np.where(labelled, 1.0 / np.asarray(perplexities, dtype=np.float64), 0.0)
    count = int(labelled.sum())
    if count == 0:
        return np.zeros(labelled.shape, dtype=np.float32)
    return (reciprocal * (count / reciprocal.sum())).astype(np.float32)


def reliability_map(score: np.ndarray, threshold: np.ndarray | float, label: np.ndarray, *,
                    lambda_alpha: float = LAMBDA_ALPHA, lambda_beta: float = LAMBDA_BETA,
                    ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Compute the RAW weight map of one pseudo-label.

    Args:
        score: float [H, W] CAM score m of each pixel (for foreground pixels the
            CAM of their label's class, for background the top CAM).
        threshold: ξ per pixel [H, W] or a scalar.
        label: uint8 [H, W] pseudo-label (0 background, 255 ignore).

    Returns:
        float32 [H, W] weights with mean 1 over labelled pixels, 0 on ignore pixels.
    """
    label = np.asarray(label)
    P = perplexity(score, threshold, label != 0, lambda_alpha=lambda_alpha, lambda_beta=lambda_beta)
    return reliability_weights(P, label != ignore_index)
