"""One image's CAMs -> pseudo-label + RAW reliability map (the work of ``wsss refine``).

:func:`refine_image` is a pure function of (image, CAM keys, CAMs, parameters,
seed), so the stage can run it in any process in any order and get the same
files.  Steps:

1. **Threshold.**  ``gmm`` (default): ξ comes from a Gaussian mixture (:mod:`wsss.gmm`)
   fitted once to the foreground scores m = max over present classes of the CAMs,
   *pooled over the whole split* (:func:`split_samples` per image, :func:`fit_split`
   once; ``--gmm-per-class``: one pooled fit and one ξ_k per class, on that class's
   CAMs).  ``gmm-image``: the same fit on each image alone.  ``fixed``: ``bg_thresh``.
   With ``fg_thresh`` (fixed mode), two labelings are made, one at ``fg_thresh`` and
   one at ``bg_thresh``; a pixel is foreground where the first says so, background
   where both say background, and 255 in between (IRN's confident regions).
2. **Label.**  Class scores are the margins ``cam_k − ξ_k``, the background score
   is 0, so the hard label is background where every CAM is below its threshold
   and otherwise the class with the largest margin (with one global ξ this is the
   class of the largest CAM).
3. **CRF** (optional).  The unary is the softmax of [0, cam_k − ξ_k] / T, which for a
   global ξ and T = 1 is exactly the softmax of [ξ, CAMs]; :func:`wsss.crf.dense_crf`
   refines it and the label becomes its argmax.
4. **Uncertainty** (GMM mode, off by default).  Pixels whose GMM component posterior is
   below ``confidence`` become 255.  Images where the GMM fell back have no posterior and
   no uncertain pixels.
5. **Reliability.**  RAW weights (:mod:`wsss.reliability`) from each pixel's CAM
   score (its label's class for foreground, the top class for background) and the
   threshold that applied to it.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsss import artifacts
from wsss.artifacts import IGNORE_INDEX
from wsss.crf import CrfParams, dense_crf
from wsss.gmm import GmmParams, GmmThreshold, gmm_threshold, no_class_threshold, sample_scores
from wsss.parallel import imap_images
from wsss.reliability import LAMBDA_ALPHA, LAMBDA_BETA, reliability_map
from wsss.settings import Settings, fail, setting

THRESHOLD_MODES = ("gmm", "gmm-image", "fixed")
IMAGE_SAMPLES = 10_000  # scores per fit with threshold="gmm-image"


@dataclass(frozen=True)
class RefineParams(Settings):
    """Everything that decides one image's pseudo-label (see the module docstring).

    A :class:`~wsss.settings.Settings` group: values are checked when it is made (a
    :class:`~wsss.settings.SettingError`, which is a ValueError, names the field as an option:
    ``--fg-thresh 0.3: needs --threshold fixed ...``).  ``wsss refine`` builds one from its options.
    """

    threshold: str = setting("gmm", "Background threshold: a Gaussian mixture of the scores pooled over the split "
                                    "(gmm), fitted per image (gmm-image), or the fixed bg_thresh.",
                             choices=THRESHOLD_MODES)
    bg_thresh: float = setting(0.20, "The fixed background threshold; also the GMM's fallback value.", above=0,
                               below=1)
    fg_thresh: float | None = setting(None, "With threshold='fixed': IRN-style confident foreground threshold "
                                            "(pixels between bg_thresh and fg_thresh become 255); None = off.",
                                      above=0, below=1)
    # one mixture over classes and no 255 band: on the demo CAMs, 3 seeds x 2 trunks, the per-class
    # mixtures and the band gave no DeepLab gain and lower pseudo-labels (bench/threshold_choice.md)
    gmm_per_class: bool = setting(False, "One GMM per class (on that class's CAMs) instead of one on the max over "
                                         "classes (ignored with threshold='fixed').")
    gmm_min_images: int = setting(10, "With threshold='gmm': a class seen in fewer images of the split uses the "
                                      "overall fit (too few images to trust a mixture of its own).", at_least=1)
    confidence: float = setting(0.0, "GMM posterior below this -> 255 (0 disables).", at_least=0, below=1)
    gmm: GmmParams = setting(factory=GmmParams, help="GMM rules; their fallback_threshold is replaced by bg_thresh.")
    crf: CrfParams | None = setting(None, "Dense-CRF settings, or None to skip the CRF.")
    unary_temperature: float = setting(1.0, "T in the CRF unary softmax([0, cam - threshold] / T).", above=0)
    lambda_alpha: float = setting(LAMBDA_ALPHA, "RAW lambda_alpha.", above=0, below=1)
    lambda_beta: float = setting(LAMBDA_BETA, "RAW lambda_beta (perplexity exponent).", above=0)

    def check(self) -> None:
        """Confident regions (``fg_thresh``) need two fixed thresholds, the upper one not below the lower."""
        if self.fg_thresh is None:
            return
        if self.threshold != "fixed":
            fail("--fg-thresh", f"{self.fg_thresh:g}: needs --threshold fixed (confident regions use two fixed "
                                "thresholds)")
        if self.fg_thresh < self.bg_thresh:
            fail("--fg-thresh", f"{self.fg_thresh:g}: must not be below --bg-thresh {self.bg_thresh:g}")

    @property
    def gmm_params(self) -> GmmParams:
        """The GMM settings with the fallback set to ``bg_thresh``."""
        return dataclasses.replace(self.gmm, fallback_threshold=self.bg_thresh)


def class_seed(seed: int, key: int) -> int:
    """Seed of one class's fit, from the image seed and the class index (not the class's position)."""
    return (seed + 7919 * int(key)) % 2**32


def _hard_label(margins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (index [H, W] of the best class, foreground bool [H, W]) from margins [K, H, W]."""
    best = margins.argmax(0)
    foreground = np.take_along_axis(margins, best[None], 0)[0] >= 0
    return best, foreground


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(0, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(0, keepdims=True)).astype(np.float32)


def label_from_thresholds(cams: np.ndarray, thresholds: np.ndarray, *, image: np.ndarray | None = None,
                          crf: CrfParams | None = None, unary_temperature: float = 1.0) -> np.ndarray:
    """Label every pixel from per-class thresholds, optionally through the dense CRF.

    Args:
        cams: float32 [K, H, W] CAMs of the present classes (K >= 1).
        thresholds: float [K] ξ_k.
        image: uint8 [H, W, 3], needed only with ``crf``.
        crf: CRF settings or None.
        unary_temperature: T of the unary softmax.

    Returns:
        int64 [H, W]: 0 = background, k + 1 = the k-th CAM (position, not class index).
    """
    margins = cams - np.asarray(thresholds, dtype=np.float32)[:, None, None]
    if crf is None:
        best, foreground = _hard_label(margins)
        return np.where(foreground, best + 1, 0)
    if image is None:
        raise ValueError("the CRF needs the image")
    logits = np.concatenate([np.zeros((1,) + margins.shape[1:], dtype=np.float32), margins]) / unary_temperature
    posterior = dense_crf(image, _softmax(logits), **crf.kwargs())
    return posterior.argmax(0)


def confident_positions(cams: np.ndarray, fg_thresholds: np.ndarray, bg_thresholds: np.ndarray, *,
                        image: np.ndarray | None = None, crf: CrfParams | None = None,
                        unary_temperature: float = 1.0) -> np.ndarray:
    """IRN's confident regions: foreground where the high thresholds say so, background where even the
    low ones say background, 255 in between; each of the two labellings is refined by the CRF if given.

    Args:
        cams: float32 [K, H, W]; fg_thresholds, bg_thresholds: float [K] (``bg <= fg``).

    Returns:
        int64 [H, W]: 0 background, k + 1 the k-th CAM plane, 255 not sure.
    """
    high = label_from_thresholds(cams, fg_thresholds, image=image, crf=crf, unary_temperature=unary_temperature)
    low = label_from_thresholds(cams, bg_thresholds, image=image, crf=crf, unary_temperature=unary_temperature)
    position = np.where(high > 0, high, IGNORE_INDEX)
    position[(high == 0) & (low == 0)] = 0
    return position


def confident_label(image: np.ndarray | None, keys: np.ndarray, cams: np.ndarray, fg_thresholds, bg_thresholds, *,
                    crf: CrfParams | None = None, unary_temperature: float = 1.0) -> np.ndarray:
    """The confident-region label map of one image (the training labels of the affinity network).

    Args:
        image: uint8 [H, W, 3] (needed with ``crf``).
        keys: int [K] class indices; cams: float [K, H, W] in [0, 1].
        fg_thresholds, bg_thresholds: float [K] per CAM plane.

    Returns:
        uint8 [H, W]: 0 background, class index, 255 not sure.
    """
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    cams = np.clip(np.asarray(cams, dtype=np.float32), 0.0, 1.0)
    if keys.size == 0:
        return np.zeros(cams.shape[1:], dtype=np.uint8)
    position = confident_positions(cams, np.asarray(fg_thresholds, np.float32), np.asarray(bg_thresholds, np.float32),
                                   image=image, crf=crf, unary_temperature=unary_temperature)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[0] = 0
    lut[1:len(keys) + 1] = keys
    return lut[position.astype(np.int64)]


@dataclass(frozen=True)
class ImageThresholds:
    """The thresholds of one image.

    Attributes:
        thresholds: float [K] ξ_k used to label each CAM plane (``bg_thresh`` for the
            low labeling of confident regions).
        reported: the values that go into the threshold statistics (one per GMM fit;
            the fixed value(s) otherwise).
        fits: the GMM results (empty in fixed mode), per class with ``gmm_per_class``.
        pooled: the fits are the split's (``threshold="gmm"``), shared by every image.
    """

    thresholds: np.ndarray
    reported: list[float]
    fits: list[GmmThreshold]
    pooled: bool = False

    def summary(self, label: np.ndarray) -> dict:
        """The small JSON-ready ``info`` dict of an image with this pseudo-label."""
        pixels = int(label.size)
        ignored = int(np.count_nonzero(label == IGNORE_INDEX))
        foreground = int(np.count_nonzero((label != 0) & (label != IGNORE_INDEX)))
        return {
            "thresholds": [round(float(t), 6) for t in self.reported],
            # a pooled fit is counted once for the split, not once per image
            "fallbacks": [] if self.pooled else [fit.fallback for fit in self.fits if fit.fallback is not None],
            "fits": 0 if self.pooled else len(self.fits),
            "pixels": pixels,
            "ignore_ratio": ignored / pixels if pixels else 0.0,
            "foreground_ratio": foreground / pixels if pixels else 0.0,
        }


@dataclass(frozen=True)
class SplitFits:
    """The pooled mixtures of a split (``threshold="gmm"``): one over all classes, and one per class.

    Attributes:
        overall: the fit of the pooled max-over-classes scores.
        per_class: class index -> the fit of that class's pooled CAM scores (``gmm_per_class``).
    """

    overall: GmmThreshold
    per_class: dict[int, GmmThreshold] = field(default_factory=dict)

    def for_class(self, key: int) -> GmmThreshold:
        """The class's own fit when it has a usable one, else the overall fit."""
        fit = self.per_class.get(int(key))
        return fit if fit is not None and fit.fallback is None else self.overall

    def as_json(self, classes: list[str] | None = None) -> dict:
        name = (lambda key: classes[key]) if classes else str
        return {"overall": self.overall.as_json(),
                "per_class": {name(key): fit.as_json() for key, fit in sorted(self.per_class.items())}}


def confident_thresholds(fits: SplitFits | None, fg_thresh: float, bg_thresh: float) -> dict:
    """The two thresholds of the confident regions (the labels ``wsss train-aff`` learns affinities from).

    Without pooled fits the fixed pair is used.  With them (CoSA's low/high pair), the high threshold of a
    class is its own pooled boundary (:meth:`SplitFits.for_class`; ``"default"``: the overall one, for a
    class without a fit), and the low one is the boundary between the two *lowest* components of the
    overall fit (:meth:`wsss.gmm.GmmFit.lower_crossing`), or half the overall threshold when that fit has
    only two components or none; the low threshold never exceeds any high one.

    Args:
        fits: the split's pooled fits (``gmm_per_class``), or None for the fixed pair.
        fg_thresh, bg_thresh: the fixed pair.

    Returns:
        ``{"fg": float or {class index: float, "default": float}, "bg": float}``.
    """
    if fits is None:
        return {"fg": fg_thresh, "bg": bg_thresh}
    fg = {key: fits.for_class(key).threshold for key in fits.per_class}
    fg["default"] = fits.overall.threshold
    overall = fits.overall.fit
    low = overall.lower_crossing() if overall is not None else None
    bg = low if low is not None and len(overall.means) > 2 else 0.5 * fits.overall.threshold
    return {"fg": fg, "bg": float(min(bg, min(fg.values())))}


def split_samples(keys: np.ndarray, cams: np.ndarray, params: RefineParams, count: int, *,
                  seed: int = 0) -> dict:
    """One image's share of the pooled GMM sample: at most ``count`` scores above ``min_score``.

    Returns:
        ``{"all": float32 [<= count]}`` (max over classes) and, with ``gmm_per_class``,
        ``{key: float32 [<= count]}`` of each class's own CAM.
    """
    keys = np.asarray(keys).reshape(-1)
    cams = np.clip(np.asarray(cams, dtype=np.float32), 0.0, 1.0)
    rng = np.random.default_rng(seed)
    floor = params.gmm.min_score

    def draw(values: np.ndarray) -> np.ndarray:
        values = values.reshape(-1)
        return sample_scores(values[values > floor], count, rng).astype(np.float32)

    if len(keys) == 0:
        return {"all": np.zeros(0, np.float32)}
    out: dict = {"all": draw(cams.max(0))}
    if params.gmm_per_class:
        out.update({int(key): draw(cams[k]) for k, key in enumerate(keys)})
    return out


def _pool(samples: list[dict]) -> tuple[dict, dict]:
    """Concatenate the samples per key; also count the images that contributed to each key."""
    pooled: dict = {}
    for sample in samples:
        for key, values in sample.items():
            pooled.setdefault(key, []).append(values)
    return ({key: np.concatenate(parts) for key, parts in pooled.items()},
            {key: len(parts) for key, parts in pooled.items()})


def fit_split(samples: list[dict], params: RefineParams, *, seed: int = 0) -> SplitFits:
    """Fit the pooled mixtures from every image's :func:`split_samples`.

    Returns:
        A :class:`SplitFits`; a class with too few scores falls back to the overall fit.
    """
    pooled, images = _pool(samples)
    gmm = params.gmm_params

    def fit(key) -> GmmThreshold:
        values = pooled.get(key, np.zeros(0, np.float32))
        return gmm_threshold(values, gmm, seed=class_seed(seed, 0 if key == "all" else key))

    return SplitFits(overall=fit("all"), per_class={key: fit(key) for key in pooled
                                                    if key != "all" and images[key] >= params.gmm_min_images})


def image_seed(seed: int, image_id: str) -> int:
    """Seed of one image: a function of the run seed and the id only (not of worker or order)."""
    return (seed * 1_000_003 + zlib.crc32(image_id.encode("utf-8"))) % 2**32


def _sample_file(task: tuple) -> dict:
    path, count, params, seed, allow_pickle, num_classes = task
    keys, cams = artifacts.read_cam(path, allow_pickle=allow_pickle, num_classes=num_classes)
    return split_samples(keys, cams, params, count, seed=seed)


def pooled_fits(cam_files: dict[str, Path], params: RefineParams, *, seed: int = 0, workers: int | None = None,
                allow_pickle: bool = False, num_classes: int | None = None, progress: bool = True) -> SplitFits:
    """The split's pooled mixtures (``threshold="gmm"``) from its CAM files.

    Every image gives an equal share of at most ``params.gmm.max_samples`` scores, seeded by its id
    (:func:`image_seed`), so the fit depends on neither the worker count nor the order of work.

    Args:
        cam_files: image id -> CAM file, every image of the split.
        num_classes: the dataset's class count; CAM keys outside it are an error naming the file.
    """
    count = max(1, math.ceil(params.gmm.max_samples / max(1, len(cam_files))))
    tasks = [(path, count, params, image_seed(seed, image_id), allow_pickle, num_classes)
             for image_id, path in cam_files.items()]
    samples = imap_images(_sample_file, tasks, workers, "gmm sample", show=progress)
    return fit_split(list(samples), params, seed=seed)


def image_thresholds(keys: np.ndarray, cams: np.ndarray, params: RefineParams = RefineParams(), *,
                     seed: int = 0, split_fits: SplitFits | None = None) -> ImageThresholds:
    """Find the thresholds of one image (the GMM fits, or the fixed values); no labelling, no CRF.

    Args:
        keys: int [K] class indices.
        cams: float [K, H, W] CAMs in [0, 1].
        params: the settings.
        seed: this image's seed.
        split_fits: the pooled fits, required for ``threshold="gmm"``.

    Returns:
        An :class:`ImageThresholds`.
    """
    keys = np.asarray(keys).reshape(-1)
    cams = np.asarray(cams, dtype=np.float32)
    count = len(keys)
    if params.threshold == "fixed":
        reported = [float(params.bg_thresh)] + ([float(params.fg_thresh)] if params.fg_thresh is not None else [])
        return ImageThresholds(np.full(count, params.bg_thresh), reported, [])
    if count == 0:
        return ImageThresholds(np.zeros(0), [float(params.bg_thresh)], [no_class_threshold(params.gmm_params)])
    if params.threshold == "gmm":
        if split_fits is None:
            raise ValueError("threshold='gmm' needs the split's pooled fits (fit_split)")
        fits = ([split_fits.for_class(key) for key in keys] if params.gmm_per_class else [split_fits.overall])
        thresholds = np.array([fit.threshold for fit in fits]) if params.gmm_per_class \
            else np.full(count, fits[0].threshold)
        return ImageThresholds(thresholds, [float(t) for t in thresholds[:len(fits)]], fits, pooled=True)
    cams = np.clip(cams, 0.0, 1.0)
    # one image's fit needs no more than ~10k of its pixels (and EM on all of them would be slow)
    gmm = dataclasses.replace(params.gmm_params, max_samples=min(params.gmm.max_samples, IMAGE_SAMPLES))
    if params.gmm_per_class:
        fits = [gmm_threshold(cams[k], gmm, seed=class_seed(seed, key)) for k, key in enumerate(keys)]
        thresholds = np.array([fit.threshold for fit in fits])
        return ImageThresholds(thresholds, [float(t) for t in thresholds], fits)
    fit = gmm_threshold(cams.max(0), gmm, seed=seed)
    return ImageThresholds(np.full(count, fit.threshold), [float(fit.threshold)], [fit])


def refine_image(image: np.ndarray | None, keys: np.ndarray, cams: np.ndarray, params: RefineParams = RefineParams(),
                 *, seed: int = 0, split_fits: SplitFits | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Turn one image's CAMs into a pseudo-label and a reliability map.

    Args:
        image: uint8 [H, W, 3] RGB image (may be None when ``params.crf`` is None).
        keys: int [K] class indices (>= 1) of the CAM planes.
        cams: float [K, H, W] CAMs in [0, 1].
        params: the settings.
        seed: this image's seed (derive it from the image id).
        split_fits: the pooled fits of the split (needed for ``threshold="gmm"``).

    Returns:
        ``(label, reliability, info)``: uint8 [H, W] (0 background, class index,
        255 ignore); float32 [H, W] RAW weights (mean 1 over labelled pixels, 0 on
        ignore); and a small JSON-ready dict with ``thresholds`` (one per fit, or the
        fixed value), ``fallbacks`` (reasons), ``fits``, ``ignore_ratio``,
        ``foreground_ratio``.

    Raises:
        ValueError: on inconsistent shapes.
    """
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    cams = np.clip(np.asarray(cams, dtype=np.float32), 0.0, 1.0)
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise ValueError(f"expected keys [K] and cams [K, H, W], got {keys.shape} and {cams.shape}")
    height, width = cams.shape[1:]
    if image is not None and tuple(image.shape[:2]) != (height, width):
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} but the CAM is {width}x{height}")
    if params.crf is not None and image is None:
        raise ValueError("the CRF needs the image")
    if keys.size and (keys.min() < 1 or keys.max() >= IGNORE_INDEX):
        raise ValueError(f"CAM keys must be class indices in 1..254, got {keys.tolist()}")

    if keys.size == 0:
        return _no_class_result(height, width, params)

    crf, temperature = params.crf, params.unary_temperature
    found = image_thresholds(keys, cams, params, seed=seed, split_fits=split_fits)
    fits, thresholds = found.fits, found.thresholds
    if params.threshold == "fixed" and params.fg_thresh is not None:
        position = confident_positions(cams, np.full(len(keys), params.fg_thresh), thresholds, image=image, crf=crf,
                                       unary_temperature=temperature)
        pixel_threshold = np.where(position > 0, params.fg_thresh, params.bg_thresh).astype(np.float32)
    else:
        position = label_from_thresholds(cams, thresholds, image=image, crf=crf, unary_temperature=temperature)
        pixel_threshold = None

    # the CAM plane that speaks for each pixel: its label's class, or the top CAM for background
    top_index = cams.argmax(0)
    plane = np.where((position > 0) & (position != IGNORE_INDEX), position - 1, top_index)
    score = np.take_along_axis(cams, plane[None], 0)[0]
    if pixel_threshold is None:
        pixel_threshold = thresholds.astype(np.float32)[plane]

    if fits and params.confidence > 0:
        if params.gmm_per_class and len(fits) == len(keys):
            per_class = np.stack([fit.confidence(cams[k]) for k, fit in enumerate(fits)])
            confidence = np.take_along_axis(per_class, plane[None], 0)[0]
        else:
            confidence = fits[0].confidence(cams.max(0))
        position = np.where(confidence < params.confidence, IGNORE_INDEX, position)

    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[0] = 0
    lut[1:len(keys) + 1] = keys
    label = lut[position.astype(np.int64)]
    reliability = reliability_map(score, pixel_threshold, label, lambda_alpha=params.lambda_alpha,
                                  lambda_beta=params.lambda_beta, ignore_index=IGNORE_INDEX)
    return label, reliability, found.summary(label)


def _no_class_result(height: int, width: int, params: RefineParams) -> tuple[np.ndarray, np.ndarray, dict]:
    """A CAM without classes: all background, uniform reliability (counted as a fallback in GMM mode)."""
    label = np.zeros((height, width), dtype=np.uint8)
    reliability = np.ones((height, width), dtype=np.float32)
    found = image_thresholds(np.zeros(0, dtype=np.int64), np.zeros((0, height, width), dtype=np.float32), params)
    return label, reliability, found.summary(label)
