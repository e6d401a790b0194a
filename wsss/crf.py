"""Fully connected CRF (Krähenbühl & Koltun, NIPS 2011) on class probabilities, via pydensecrf.

The CRF keeps the per-pixel class probabilities as unary terms (−log p) and adds
two pairwise Potts kernels over all pixel pairs:

* a Gaussian (smoothness) kernel over position, width ``gaussian_sxy`` pixels,
  weight ``gaussian_compat``, which removes isolated pixels;
* a bilateral (appearance) kernel over position (``bilateral_sxy``) and colour
  (``bilateral_srgb``), weight ``bilateral_compat``, which pulls pixels of similar
  colour nearby to the same label, so label boundaries snap to colour edges.

Defaults are those IRN (Ahn et al., CVPR 2019) uses to refine CAM pseudo-labels:
Gaussian sxy 3 / compat 3, bilateral sxy 50 / srgb 5 / compat 10, 10 mean-field
iterations; AffinityNet/SEAM use bilateral sxy 80 and srgb 13 instead.  For the
final post-processing of a segmentation network's output the DeepLab values
(Gaussian 1/3, bilateral sxy 67 srgb 3 compat 4: the defaults of ``wsss predict --crf``) are
the usual choice.

``scale < 1`` runs the CRF on an image and probabilities resized by ``scale``
(kernel widths in pixels scaled with it, so they cover the same part of the
image) and resizes the posterior back: the cost is roughly proportional to the
pixel count, so 0.5 is about 4x faster, at the price of blockier boundaries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from wsss.settings import Settings, setting


@dataclass(frozen=True)
class CrfParams(Settings):
    """Dense-CRF settings; ``dense_crf(image, probs, **params.kwargs())``.

    On the command line a stage's CRF group appears as ``--crf-iterations``, ``--crf-gaussian-sxy``, ...
    """

    iterations: int = setting(10, "Mean-field iterations.", at_least=1)
    gaussian_sxy: float = setting(3.0, "Smoothness kernel width, pixels.", above=0)
    gaussian_compat: float = setting(3.0, "Smoothness kernel weight.", at_least=0)
    bilateral_sxy: float = setting(50.0, "Appearance kernel width in position, pixels.", above=0)
    bilateral_srgb: float = setting(5.0, "Appearance kernel width in colour, 0-255 levels.", above=0)
    bilateral_compat: float = setting(10.0, "Appearance kernel weight.", at_least=0)
    scale: float = setting(1.0, "Run the CRF at this fraction of the resolution (about 1/scale^2 faster).",
                           above=0, at_most=1)

    def kwargs(self) -> dict:
        """The settings as keyword arguments of :func:`dense_crf`."""
        return asdict(self)


#: Pseudo-label refinement (``wsss refine --crf``): IRN's and SEAM's values.
PSEUDO_LABEL_CRF = CrfParams()
#: Post-processing of a segmentation network's output (``wsss predict --crf``): DeepLab-v2's values.
POSTPROCESS_CRF = CrfParams(iterations=10, gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0,
                            bilateral_srgb=3.0, bilateral_compat=4.0)


def _resize(array: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """Resize an [H, W, C] (or [H, W]) array to ``size`` = (H, W) with OpenCV."""
    import cv2

    height, width = size
    return cv2.resize(array, (width, height), interpolation=interpolation)


def dense_crf(image: np.ndarray, probs: np.ndarray, *, iterations: int = 10, gaussian_sxy: float = 3.0,
              gaussian_compat: float = 3.0, bilateral_sxy: float = 50.0, bilateral_srgb: float = 5.0,
              bilateral_compat: float = 10.0, scale: float = 1.0) -> np.ndarray:
    """Refine class probabilities with a fully connected CRF.

    Args:
        image: uint8 [H, W, 3] RGB image.
        probs: float [C, H, W] class probabilities (each pixel's column sums to 1;
            they are clipped to >= 1e-5 before −log).
        iterations: mean-field iterations.
        gaussian_sxy, gaussian_compat: smoothness kernel width (pixels) and weight.
        bilateral_sxy, bilateral_srgb, bilateral_compat: appearance kernel widths
            (pixels, colour levels) and weight.
        scale: run at this fraction of the resolution (0 < scale <= 1).

    Returns:
        float32 [C, H, W]: the CRF posterior (sums to 1 per pixel).

    Raises:
        ValueError: on shapes or dtypes the CRF cannot take, or non-finite probabilities or settings
            (pydensecrf would crash the process on them).
    """
    import cv2
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    image = np.asarray(image)
    probs = np.asarray(probs, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be [C, H, W] with H, W = {image.shape[:2]}, got {probs.shape}")
    if probs.shape[0] < 1:
        raise ValueError("probs needs at least one class")
    if not np.isfinite(probs).all():
        raise ValueError("probs hold NaN or infinite values")
    CrfParams(iterations, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat, scale)
    num_classes, height, width = probs.shape
    if num_classes == 1:
        return np.ones_like(probs)

    work_image, work_probs = image, probs
    if scale < 1.0:
        small = (max(1, round(height * scale)), max(1, round(width * scale)))
        work_image = _resize(image, small, cv2.INTER_AREA)
        work_probs = _resize(probs.transpose(1, 2, 0), small, cv2.INTER_LINEAR).reshape(small + (num_classes,))
        work_probs = work_probs.transpose(2, 0, 1)
        work_probs = work_probs / np.maximum(work_probs.sum(0, keepdims=True), 1e-8)
    work_height, work_width = work_probs.shape[1:]

    crf = dcrf.DenseCRF2D(work_width, work_height, num_classes)
    unary = unary_from_softmax(work_probs, clip=1e-5)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=gaussian_sxy * scale, compat=gaussian_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy * scale, srgb=bilateral_srgb,
                             rgbim=np.ascontiguousarray(work_image), compat=bilateral_compat)
    posterior = np.asarray(crf.inference(iterations), dtype=np.float32).reshape(num_classes, work_height, work_width)

    if scale < 1.0:
        posterior = _resize(posterior.transpose(1, 2, 0), (height, width), cv2.INTER_LINEAR)
        posterior = posterior.reshape(height, width, num_classes).transpose(2, 0, 1)
        posterior = posterior / np.maximum(posterior.sum(0, keepdims=True), 1e-8)
    return np.ascontiguousarray(posterior, dtype=np.float32)


def crf_label(image: np.ndarray, probs: np.ndarray, params: CrfParams) -> np.ndarray:
    """uint8 [H, W] labels of the image: the argmax of :func:`dense_crf` with ``params``.

    ``probs`` [C, h, w] may be smaller than the image [H, W, 3] (an image segmented scaled down, at
    ``wsss predict --max-side``): the CRF then runs at their size, on the image scaled down to it
    (its kernels are in those pixels, the scale they were chosen at), and the labels are scaled up
    to the image's size (nearest neighbour).
    """
    import cv2

    size = tuple(probs.shape[1:])
    small = image if size == image.shape[:2] else _resize(image, size, cv2.INTER_AREA)
    label = dense_crf(small, probs, **params.kwargs()).argmax(0).astype(np.uint8)
    return label if size == image.shape[:2] else _resize(label, image.shape[:2], cv2.INTER_NEAREST)
