"""Dynamic background threshold from a 1-D Gaussian mixture of CAM scores.

The foreground score of a pixel is the largest CAM value over the classes present.
Its histogram is *not* a clean pair of "background" and "object" modes: after the
ReLU most pixels sit at or near 0, and the rest form a long, slowly falling tail in
which background that the CAM bleeds into and the objects overlap (measured on the
demo data: 11 % of the pixels are object, yet background pixels cover all of [0, 1]).
A two-component mixture fitted to one image puts one component on the near-zero
mass and one on everything else, and the boundary between them lands far too low
(median 0.28 against a best fixed threshold of 0.58 there).

What works is what CoSA (Yang et al., ECCV 2024) does: fit ``K = 3`` (here 4, below) components --
the low mass, the bleeding tail, the strongly activated mode -- to scores pooled over
many images (CoSA keeps a queue of about 200 images; ``wsss refine`` pools a seeded
sample of every image of the split) and take the boundary between the two *upper*
components as ξ*.  We take that boundary where the two weighted component densities
cross,

    w_a N(ξ; μ_a, σ_a) = w_b N(ξ; μ_b, σ_b),   a, b = the two components with the largest means,

i.e. the Bayes decision boundary between them, solved in closed form by
:func:`gaussian_crossing` (CoSA takes the smallest score assigned to the top
component, which is the same point up to sampling).  On the demo CAMs this gives 0.60
against the ground-truth-picked 0.58.

The default is ``K = 4``, one more than CoSA: on the plain CAMs of the four dataset styles of
``wsss demo-data`` over three seeds (``bench/partial_cams.md``, "Refinements of the plain CAMs
over the styles") four components gave pseudo-labels (+ CRF) of 51.5 ± 3.6 mIoU on the styles'
mean, three 49.6 ± 3.1, five 50.7 ± 2.6, two 40.4 ± 4.0; four beat three on every seed and on
three styles of four.  Where CAMs cover only a part of each object (the ``parts`` style) more
components keep the part alone and two do better; no label-free signal found so far tells the
two cases apart (``bench/threshold_signals.md``).  The posterior of the top component tells how
sure a pixel's side is; the refine stage marks unsure pixels as ignore (255).

:func:`gmm_threshold` fits any sample of scores: one image's map (``--threshold
gmm-image``) or the pooled sample of a split (``--threshold gmm``).  Degenerate samples
are detected by explicit rules, checked in this order, and fall back to
``GmmParams.fallback_threshold`` (the refine stage passes ``--bg-thresh``); each rule's
name is counted in the stage's ``metrics.json``:

``no_classes``
    the CAM file lists no class (nothing to threshold; the image becomes background).
``empty``
    fewer than ``min_samples`` scores lie above ``min_score``: the CAM is (almost) all
    zero, no object mode exists.
``flat``
    the scores above ``min_score`` have a standard deviation below ``flat_std``.
``one_mode``
    the Bayesian information criterion (Schwarz 1978) of the K-component fit is not lower
    than that of one Gaussian, or one of the two upper components holds less than
    ``min_weight`` of the scores: nothing to split.
``full_frame``
    the *lowest* component's mean is at least ``max_background_mean``: every mode is
    object (it fills the frame), so splitting them would cut the object in two.
``no_crossing``
    the weighted densities of the upper two components do not cross exactly once
    between their means.

Scores at or below ``min_score`` are left out of the fit (CoSA filters at 0.05): after
the ReLU a CAM holds a spike of exact zeros that would otherwise take a component of its
own with a near-zero variance.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from wsss.settings import Settings, setting

FALLBACK_REASONS = ("no_classes", "empty", "flat", "one_mode", "full_frame", "no_crossing")


@dataclass(frozen=True)
class GmmParams(Settings):
    """Settings of the GMM threshold (defaults documented in the module docstring and README).

    A :class:`~wsss.settings.Settings` group: every value is checked when it is made, and a bad one is a
    :class:`~wsss.settings.SettingError` (a ValueError) naming the field, e.g. ``--reg-covar 0: must be > 0``.
    """

    components: int = setting(4, "K, the number of Gaussian components (CoSA: 3; 2 is the classic split; 4 chosen on "
                                 "the dataset styles, see the module docstring).", at_least=2)
    fallback_threshold: float = setting(0.20, "The threshold used when a rule declares the sample degenerate.",
                                        at_least=0, at_most=1)
    max_samples: int = setting(200_000, "At most this many scores (drawn without replacement, seeded) enter one "
                                        "fit.", at_least=2)
    min_score: float = setting(0.05, "Scores at or below this are left out of the fit (CoSA's 0.05).")
    min_samples: int = setting(50, "Fewer scores above min_score than this: 'empty'.", at_least=2)
    flat_std: float = setting(0.01, "A standard deviation below this: 'flat'.", at_least=0)
    min_weight: float = setting(0.01, "One of the upper two components lighter than this: 'one_mode'.", at_least=0)
    max_background_mean: float = setting(0.40, "The lowest component's mean at or above this: 'full_frame'.")
    reg_covar: float = setting(1e-4, "Variance added by EM for numerical stability (a floor of sigma ~ 0.01).",
                               above=0)
    max_iter: int = setting(200, "EM iterations.", at_least=1)


@dataclass(frozen=True)
class GmmFit:
    """A fitted 1-D mixture, components sorted by mean (index 0 = lowest, -1 = top)."""

    weights: tuple[float, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]

    def log_weighted_density(self, scores: np.ndarray) -> np.ndarray:
        """Return float64 [K, ...]: log(w_k N(x; μ_k, σ_k)) for every component."""
        x = np.asarray(scores, dtype=np.float64)
        out = []
        for weight, mean, std in zip(self.weights, self.means, self.stds):
            out.append(math.log(weight) - math.log(std) - 0.5 * math.log(2 * math.pi) - 0.5 * ((x - mean) / std) ** 2)
        return np.stack(out)

    def upper_pair(self) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
        """``(weights, means, stds)`` of the two components with the largest means."""
        return self.weights[-2:], self.means[-2:], self.stds[-2:]

    def crossing(self) -> float | None:
        """The Bayes boundary between the two upper components (see :func:`gaussian_crossing`)."""
        return gaussian_crossing(*self.upper_pair())

    def lower_crossing(self) -> float | None:
        """The Bayes boundary between the two *lowest* components: below it a score is surely background
        (the low threshold of CoSA's confident regions; with K = 2 it is :meth:`crossing`)."""
        return gaussian_crossing(self.weights[:2], self.means[:2], self.stds[:2])

    def foreground_posterior(self, scores: np.ndarray) -> np.ndarray:
        """Return float32 [...]: P(top component | score), every component below the top being background.

        Scores are clipped to [μ_lowest, μ_top] first: beyond an extreme mean the pixel is at least as clear
        as the mean itself, and the clip stops the tail of a broader component from making extreme scores
        look uncertain (the quadratic's second root).  With K = 2 this is the top against the one below;
        with more, a score on the lowest component is sure background however near the top its neighbour
        lies (against the neighbour alone, every score below the neighbour's mean had that mean's
        confidence: 0.896 on a 4-component fit of partial CAMs, so ``--confidence 0.9`` ignored 93 % of
        the pixels).  At the threshold (the upper pair's crossing) it is 1/2 up to the lower components'
        density there.
        """
        x = np.clip(np.asarray(scores, dtype=np.float64), self.means[0], self.means[-1])
        log_density = self.log_weighted_density(x)
        log_high, log_low = log_density[-1], np.logaddexp.reduce(log_density[:-1], axis=0)
        # logistic of the log ratio, written to avoid overflow
        return (0.5 * (1.0 + np.tanh(0.5 * (log_high - log_low)))).astype(np.float32)

    def as_json(self) -> dict:
        """The mixture as rounded JSON numbers."""
        return {"weights": [round(v, 6) for v in self.weights], "means": [round(v, 6) for v in self.means],
                "stds": [round(v, 6) for v in self.stds]}


@dataclass(frozen=True)
class GmmThreshold:
    """The threshold of one sample (an image, a class, a split) and how it was found.

    Attributes:
        threshold: ξ* (or the fallback value).
        fit: the mixture, or None for ``no_classes``/``empty``/``flat``.
        fallback: None when ξ* came from the mixture, else the rule's name.
    """

    threshold: float
    fit: GmmFit | None = None
    fallback: str | None = None

    def confidence(self, scores: np.ndarray) -> np.ndarray:
        """Return float32 [...]: the larger of P(top) and 1 - P(top) per score.

        A fallback has no usable mixture, so every pixel gets confidence 1 (the image is
        thresholded, nothing is marked uncertain).
        """
        if self.fallback is not None or self.fit is None:
            return np.ones(np.shape(scores), dtype=np.float32)
        posterior = self.fit.foreground_posterior(scores)
        return np.maximum(posterior, 1.0 - posterior)

    def as_json(self) -> dict:
        return {"threshold": round(float(self.threshold), 6), "fallback": self.fallback,
                "fit": None if self.fit is None else self.fit.as_json()}


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


def fit_mixture(samples: np.ndarray, components: int = 3, *, reg_covar: float = 1e-4, max_iter: int = 200,
                seed: int = 0) -> tuple[GmmFit, float, float]:
    """Fit a K-component 1-D mixture (EM, scikit-learn).

    EM starts from equal weights, means at evenly spaced quantiles (10 % .. 90 %) and a
    variance of ``var / K²``, so the fit is deterministic for given samples.

    Args:
        samples: float [N] scores.
        components: K.

    Returns:
        ``(fit, bic_k, bic_one)``: the mixture sorted by mean, and the BIC of the K-component
        and of the one-Gaussian model on the same samples.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    x = np.asarray(samples, dtype=np.float64).reshape(-1, 1)
    starts = np.quantile(x, np.linspace(0.1, 0.9, components)).reshape(-1, 1)
    # every start value is given, so EM needs no k-means start (faster, and independent of thread count)
    start_variance = max(float(x.var()) / components ** 2, reg_covar)
    mixture = GaussianMixture(n_components=components, covariance_type="full", reg_covar=reg_covar,
                              max_iter=max_iter, init_params="random", weights_init=[1.0 / components] * components,
                              means_init=starts, precisions_init=[[[1.0 / start_variance]]] * components,
                              random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mixture.fit(x)
    order = np.argsort(mixture.means_.ravel())
    fit = GmmFit(weights=tuple(float(v) for v in mixture.weights_[order]),
                 means=tuple(float(v) for v in mixture.means_.ravel()[order]),
                 stds=tuple(float(v) for v in np.sqrt(mixture.covariances_.ravel()[order])))
    n = x.shape[0]
    bic_k = float(mixture.bic(x))
    # one Gaussian, regularised like the mixture's components: variance v + reg_covar
    sample_variance = float(x.var())
    variance = sample_variance + reg_covar
    log_likelihood_one = -0.5 * n * (math.log(2 * math.pi * variance) + sample_variance / variance)
    bic_one = -2.0 * log_likelihood_one + 2 * math.log(n)  # 2 free parameters: mean, variance
    return fit, bic_k, bic_one


def sample_scores(scores: np.ndarray, max_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Return at most ``max_samples`` values of ``scores`` drawn without replacement."""
    flat = np.asarray(scores).reshape(-1)
    if flat.size <= max_samples:
        return flat
    return flat[rng.choice(flat.size, size=max_samples, replace=False)]


def gmm_threshold(scores: np.ndarray, params: GmmParams = GmmParams(), *, seed: int = 0) -> GmmThreshold:
    """Find the dynamic background threshold of a sample of scores.

    Args:
        scores: float (any shape) foreground scores in [0, 1]: one image's map, or a sample
            pooled over many images.
        params: number of components, rules and fallback value (see the module docstring).
        seed: seeds the subsample and EM; derive it from the image id (or the run seed for a
            pooled sample) so that results do not depend on the order of work.

    Returns:
        A :class:`GmmThreshold` with ξ*, the fit and the fallback reason (None if none).
    """
    fallback = params.fallback_threshold
    rng = np.random.default_rng(seed)
    values = np.asarray(scores, dtype=np.float32).reshape(-1)
    values = values[values > params.min_score]
    if values.size < max(params.min_samples, params.components):
        return GmmThreshold(fallback, None, "empty")
    values = sample_scores(values, params.max_samples, rng)
    if float(values.std()) < params.flat_std:
        return GmmThreshold(fallback, None, "flat")
    fit, bic_k, bic_one = fit_mixture(values, params.components, reg_covar=params.reg_covar,
                                      max_iter=params.max_iter, seed=seed)
    if bic_k >= bic_one or min(fit.weights[-2:]) < params.min_weight:
        return GmmThreshold(fallback, fit, "one_mode")
    if fit.means[0] >= params.max_background_mean:
        return GmmThreshold(fallback, fit, "full_frame")
    crossing = fit.crossing()
    if crossing is None:
        return GmmThreshold(fallback, fit, "no_crossing")
    return GmmThreshold(float(crossing), fit, None)


def no_class_threshold(params: GmmParams = GmmParams()) -> GmmThreshold:
    """The result for a CAM file without classes (counted as ``no_classes``)."""
    return GmmThreshold(params.fallback_threshold, None, "no_classes")
