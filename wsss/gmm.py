"""Per-image dynamic background threshold from a two-component 1-D Gaussian mixture.

The foreground score of a pixel (the largest CAM value over the classes present)
is bimodal on a typical image: a low mode for background and a high mode for the
object.  A two-component Gaussian mixture is fitted to a bounded, seeded sample of
those scores (scikit-learn EM), and the threshold ξ* is the score where the two
*weighted* component densities cross between the two means,

    w_lo N(ξ; μ_lo, σ_lo) = w_hi N(ξ; μ_hi, σ_hi),

i.e. the Bayes decision boundary, which also maximises the likelihood of the
split "below ξ is background, above is foreground".  Taking logarithms gives a
quadratic in ξ that :func:`gaussian_crossing` solves in closed form.  The
component posterior of each pixel tells how sure that split is; the refine stage
marks unsure pixels as ignore (255).

Degenerate images are detected by explicit rules, checked in this order, and
fall back to ``GmmParams.fallback_threshold`` (the refine stage passes
``--bg-thresh``); each rule's name is counted in the stage's ``metrics.json``:

``no_classes``
    the CAM file lists no class (nothing to threshold; the image becomes background).
``empty``
    fewer than ``min_samples`` pixels score above ``min_score``: the CAM is
    (almost) all zero, no object mode exists.
``flat``
    the scores above ``min_score`` have a standard deviation below ``flat_std``:
    a constant CAM has no split.
``one_mode``
    the Bayesian information criterion (Schwarz 1978) of the two-component fit is
    not lower than that of a single Gaussian, or one component holds less than
    ``min_weight`` of the pixels: the scores are unimodal.
``full_frame``
    the lower component's mean is at least ``max_background_mean``: both modes are
    object (it fills the frame), so splitting them would cut the object in two.
``no_crossing``
    the weighted densities do not cross exactly once between the means (one
    component dominates the whole interval), so there is no boundary to take.

Scores at or below ``min_score`` are left out of the fit (CoSA, Yang et al. 2024,
filters at 0.05): after the ReLU a CAM holds a spike of exact zeros that would
otherwise take a component of its own with a near-zero variance and pull the
threshold down to almost 0.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from wsss.errors import check_finite_fields

FALLBACK_REASONS = ("no_classes", "empty", "flat", "one_mode", "full_frame", "no_crossing")


@dataclass(frozen=True)
class GmmParams:
    """Settings of the GMM threshold (defaults documented in the module docstring and README).

    Attributes:
        fallback_threshold: ξ used when a rule declares the image degenerate.
        max_samples: at most this many pixels (drawn without replacement, seeded) enter the fit.
        min_score: scores at or below this are left out of the fit (CoSA's 0.05).
        min_samples: fewer scores above ``min_score`` than this -> ``empty``.
        flat_std: standard deviation below this -> ``flat``.
        min_weight: a component lighter than this -> ``one_mode``.
        max_background_mean: lower component mean at or above this -> ``full_frame``.
        reg_covar: variance added by EM for numerical stability (a floor of σ ≈ 0.01).
        max_iter: EM iterations.
    """

    fallback_threshold: float = 0.20
    max_samples: int = 10_000
    min_score: float = 0.05
    min_samples: int = 50
    flat_std: float = 0.01
    min_weight: float = 0.01
    max_background_mean: float = 0.40
    reg_covar: float = 1e-4
    max_iter: int = 100

    def __post_init__(self) -> None:
        check_finite_fields(self)
        if not 0.0 <= self.fallback_threshold <= 1.0:
            raise ValueError(f"fallback_threshold must lie in [0, 1], got {self.fallback_threshold}")
        if self.max_samples < 2 or self.min_samples < 2:
            raise ValueError("max_samples and min_samples must be at least 2")
        if self.reg_covar <= 0:
            raise ValueError("reg_covar must be positive")


@dataclass(frozen=True)
class GmmFit:
    """A fitted two-component 1-D mixture, components sorted by mean (index 0 = low = background)."""

    weights: tuple[float, float]
    means: tuple[float, float]
    stds: tuple[float, float]

    def log_weighted_density(self, scores: np.ndarray) -> np.ndarray:
        """Return float64 [2, ...]: log(w_k N(x; μ_k, σ_k)) for both components."""
        x = np.asarray(scores, dtype=np.float64)
        out = []
        for weight, mean, std in zip(self.weights, self.means, self.stds):
            out.append(math.log(weight) - math.log(std) - 0.5 * math.log(2 * math.pi) - 0.5 * ((x - mean) / std) ** 2)
        return np.stack(out)

    def foreground_posterior(self, scores: np.ndarray) -> np.ndarray:
        """Return float32 [...]: P(high component | score).

        Scores are clipped to [μ_lo, μ_hi] first: beyond a mean the pixel is at
        least as clear as the mean itself, and the clip stops the tail of a broader
        component from making extreme scores look uncertain (the quadratic's second root).
        """
        x = np.clip(np.asarray(scores, dtype=np.float64), self.means[0], self.means[1])
        log_lo, log_hi = self.log_weighted_density(x)
        # logistic of the log ratio, written to avoid overflow
        return (0.5 * (1.0 + np.tanh(0.5 * (log_hi - log_lo)))).astype(np.float32)


@dataclass(frozen=True)
class GmmThreshold:
    """The threshold of one image (or one class) and how it was found.

    Attributes:
        threshold: ξ* (or the fallback value).
        fit: the mixture, or None for ``no_classes``/``empty``/``flat``.
        fallback: None when ξ* came from the mixture, else the rule's name.
    """

    threshold: float
    fit: GmmFit | None = None
    fallback: str | None = None

    def confidence(self, scores: np.ndarray) -> np.ndarray:
        """Return float32 [...]: the larger component posterior per score.

        A fallback has no usable mixture, so every pixel gets confidence 1 (the
        image is thresholded, nothing is marked uncertain).
        """
        if self.fallback is not None or self.fit is None:
            return np.ones(np.shape(scores), dtype=np.float32)
        posterior = self.fit.foreground_posterior(scores)
        return np.maximum(posterior, 1.0 - posterior)

    def as_dict(self) -> dict:
        fit = None if self.fit is None else {
            "weights": [round(v, 6) for v in self.fit.weights],
            "means": [round(v, 6) for v in self.fit.means],
            "stds": [round(v, 6) for v in self.fit.stds],
        }
        return {"threshold": round(float(self.threshold), 6), "fallback": self.fallback, "fit": fit}


def gaussian_crossing(weights, means, stds) -> float | None:
    """Return the score between the means where the weighted densities are equal, or None.

    Solves ``log w0 N(x; μ0, σ0) = log w1 N(x; μ1, σ1)``, the quadratic
    ``a x² + b x + c = 0`` with

        a = 1/(2σ1²) − 1/(2σ0²),  b = μ0/σ0² − μ1/σ1²,
        c = μ1²/(2σ1²) − μ0²/(2σ0²) + log(w0 σ1 / (w1 σ0)).

    Args:
        weights, means, stds: pairs for the two components; ``means[0] < means[1]``.

    Returns:
        The single root inside ``(μ0, μ1)``, or None when the log ratio has the same
        sign at both means (no crossing, or two crossings, between them).
    """
    (w0, w1), (m0, m1), (s0, s1) = weights, means, stds
    if not (m0 < m1 and s0 > 0 and s1 > 0 and w0 > 0 and w1 > 0):
        return None
    a = 1.0 / (2 * s1 ** 2) - 1.0 / (2 * s0 ** 2)
    b = m0 / s0 ** 2 - m1 / s1 ** 2
    c = m1 ** 2 / (2 * s1 ** 2) - m0 ** 2 / (2 * s0 ** 2) + math.log(w0 * s1 / (w1 * s0))

    def ratio(x: float) -> float:  # log(w0 N0) − log(w1 N1) at x
        return a * x * x + b * x + c

    # exactly one root inside the interval <=> the ratio changes sign between the means
    if not (ratio(m0) > 0 > ratio(m1)):
        return None
    if abs(a) < 1e-12 * max(abs(b), 1.0):
        return -c / b
    disc = b * b - 4 * a * c
    if disc < 0:  # impossible after the sign change, kept for rounding safety
        return None
    sqrt_disc = math.sqrt(disc)
    # numerically stable pair of roots
    q = -0.5 * (b + math.copysign(sqrt_disc, b))
    roots = [q / a, c / q] if q != 0 else [-b / (2 * a)]
    inside = [root for root in roots if m0 < root < m1]
    return inside[0] if inside else None


def fit_two_gaussians(samples: np.ndarray, *, reg_covar: float = 1e-4, max_iter: int = 100,
                      seed: int = 0) -> tuple[GmmFit, float, float]:
    """Fit a two-component mixture to 1-D samples (EM, scikit-learn).

    EM starts from equal weights, means at the 10th and 90th percentiles and a
    quarter of the sample variance, so the fit is deterministic for given samples.

    Args:
        samples: float [N] scores.

    Returns:
        ``(fit, bic_two, bic_one)``: the mixture sorted by mean, and the BIC of the
        two-component and of the one-Gaussian model on the same samples.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    x = np.asarray(samples, dtype=np.float64).reshape(-1, 1)
    low, high = np.quantile(x, [0.1, 0.9])
    # every start value is given, so EM needs no k-means start (faster, and independent of thread count)
    start_variance = max(float(x.var()) / 4.0, reg_covar)
    mixture = GaussianMixture(n_components=2, covariance_type="full", reg_covar=reg_covar, max_iter=max_iter,
                              init_params="random", weights_init=[0.5, 0.5], means_init=[[low], [high]],
                              precisions_init=[[[1.0 / start_variance]]] * 2, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mixture.fit(x)
    order = np.argsort(mixture.means_.ravel())
    weights = mixture.weights_[order]
    means = mixture.means_.ravel()[order]
    stds = np.sqrt(mixture.covariances_.ravel()[order])
    fit = GmmFit(weights=(float(weights[0]), float(weights[1])), means=(float(means[0]), float(means[1])),
                 stds=(float(stds[0]), float(stds[1])))
    n = x.shape[0]
    bic_two = float(mixture.bic(x))
    # one Gaussian, regularised like the mixture's components: variance v + reg_covar
    sample_variance = float(x.var())
    variance = sample_variance + reg_covar
    log_likelihood_one = -0.5 * n * (math.log(2 * math.pi * variance) + sample_variance / variance)
    bic_one = -2.0 * log_likelihood_one + 2 * math.log(n)  # 2 free parameters: mean, variance
    return fit, bic_two, bic_one


def sample_scores(scores: np.ndarray, max_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Return at most ``max_samples`` values of ``scores`` drawn without replacement."""
    flat = np.asarray(scores).reshape(-1)
    if flat.size <= max_samples:
        return flat
    return flat[rng.choice(flat.size, size=max_samples, replace=False)]


def gmm_threshold(scores: np.ndarray, params: GmmParams = GmmParams(), *, seed: int = 0) -> GmmThreshold:
    """Find the dynamic background threshold of one score map.

    Args:
        scores: float [H, W] (or any shape) foreground scores in [0, 1].
        params: rules and fallback value (see the module docstring).
        seed: seeds the pixel subsample and EM; derive it from the image id so
            that results do not depend on the order images are processed in.

    Returns:
        A :class:`GmmThreshold` with ξ*, the fit and the fallback reason (None if none).
    """
    fallback = params.fallback_threshold
    rng = np.random.default_rng(seed)
    values = np.asarray(scores, dtype=np.float32).reshape(-1)
    values = values[values > params.min_score]
    if values.size < params.min_samples:
        return GmmThreshold(fallback, None, "empty")
    values = sample_scores(values, params.max_samples, rng)
    if float(values.std()) < params.flat_std:
        return GmmThreshold(fallback, None, "flat")
    fit, bic_two, bic_one = fit_two_gaussians(values, reg_covar=params.reg_covar, max_iter=params.max_iter, seed=seed)
    if bic_two >= bic_one or min(fit.weights) < params.min_weight:
        return GmmThreshold(fallback, fit, "one_mode")
    if fit.means[0] >= params.max_background_mean:
        return GmmThreshold(fallback, fit, "full_frame")
    crossing = gaussian_crossing(fit.weights, fit.means, fit.stds)
    if crossing is None:
        return GmmThreshold(fallback, fit, "no_crossing")
    return GmmThreshold(float(crossing), fit, None)


def no_class_threshold(params: GmmParams = GmmParams()) -> GmmThreshold:
    """The result for a CAM file without classes (counted as ``no_classes``)."""
    return GmmThreshold(params.fallback_threshold, None, "no_classes")
