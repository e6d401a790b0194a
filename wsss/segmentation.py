"""Segmentation loss and inference: ignore-aware (optionally reliability-weighted) cross-entropy
and multi-scale + flip prediction.

Loss definition (used by ``wsss train-seg``)
--------------------------------------------
For logits ``z`` [B, C, H, W], labels ``y`` [B, H, W] and, optionally,
per-pixel weights ``w`` [B, H, W], let ``L = {p : y_p != 255}`` be the
labelled pixels of the whole batch and ``ce_p = -log softmax(z_p)[y_p]``.
Then::

    loss = sum_{p in L} ce_p / |L|              without weights
    loss = sum_{p in L} w_p * ce_p / |L|        with weights (RAW)

The weighted loss divides by the *number* of labelled pixels, not by the sum
of the weights: when the reliability maps average 1 it has the scale of the
plain loss, and a batch of unreliable pixels really contributes less instead
of being renormalised back to full strength.  A batch without any labelled
pixel has loss 0 (still connected to the graph, so DDP's gradient reduction
does not stall).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsss.artifacts import IGNORE_INDEX
from wsss.crf import CrfParams, crf_label
from wsss.transforms import normalize_image


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy over labelled pixels, optionally weighted per pixel (see the module docstring).

    Args:
        logits: float [B, C, H, W].
        target: int64 [B, H, W] class indices; ``ignore_index`` pixels do not count.
        weight: optional float [B, H, W] per-pixel weights (reliability maps); ignored pixels'
            weights are not used.
        ignore_index: label value to skip (255).

    Returns:
        A scalar tensor.
    """
    if logits.ndim != 4:
        raise ValueError(f"expected logits [B, C, H, W], got {tuple(logits.shape)}")
    if target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"expected target [B, H, W] = {[logits.shape[0], *logits.shape[2:]]}, got {list(target.shape)}")
    if weight is not None and weight.shape != target.shape:
        raise ValueError(f"expected weight of the target's shape {list(target.shape)}, got {list(weight.shape)}")
    per_pixel = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")  # 0 where ignored
    labelled = (target != ignore_index).sum()
    if weight is not None:
        per_pixel = per_pixel * torch.where(target != ignore_index, weight.to(per_pixel.dtype), 0.0)
    return per_pixel.sum() / labelled.clamp(min=1)


def shrunk_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """``size`` (H, W) scaled down so that its longer side is at most ``max_side`` (None: unchanged)."""
    if max_side is None or max(size) <= max_side:
        return size
    factor = max_side / max(size)
    return max(1, round(size[0] * factor)), max(1, round(size[1] * factor))


def segment_batch(model: nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = True,
                  precision=None, max_side: int | None = None, full_size: bool = True) -> torch.Tensor:
    """Class probabilities of a batch, averaged over scales and horizontal flips, on the batch's device.

    Each scale resizes the batch (bilinear), runs it with its mirror images appended as one
    forward pass, upsamples the logits and averages the softmax of all views.

    A batch whose longer side exceeds ``max_side`` is first scaled down (antialiased) so that it
    does not; ``scales`` then apply to that size, the views are averaged there, and the average is
    upsampled to the input size once (or returned at the working size, ``full_size=False``, for a
    caller that upsamples one image at a time: [C, H, W] floats of a 12-megapixel photo are 1 GB
    for 21 classes).  A network trained on crops of a few hundred pixels sees the objects of a
    4000-pixel photo at a size it knows, and its activations stay those of a 1024-pixel image.

    Args:
        model: maps float [B, 3, h, w] to logits [B, C, h, w], in eval mode.
        images: float [B, 3, H, W], ImageNet-normalised, one size.
        scales: resize factors (1.0 = original size, or the ``max_side`` size).
        flip: also use the horizontally flipped images.
        precision: a :class:`wsss.training.Precision` for autocast and memory layout (default: float32).
        max_side: longest side the network sees at scale 1 (pixels); None = the input's size.
        full_size: upsample the probabilities to the input's size (else: at :func:`shrunk_size`).

    Returns:
        float32 [B, C, H, W] probabilities summing to 1 over C, at the input's size.
    """
    from wsss.cam import resize_images

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    if not scales:
        raise ValueError("need at least one scale")
    batch, size = images.shape[0], tuple(images.shape[-2:])
    work_size = shrunk_size(size, max_side)
    if work_size != size:
        images = F.interpolate(images, size=work_size, mode="bilinear", align_corners=False, antialias=True)
    total = None
    with torch.inference_mode():
        for scale in scales:
            inputs = resize_images(images, scale)
            if flip:
                inputs = torch.cat([inputs, inputs.flip(-1)])
            if precision is not None:
                with precision.autocast(images.device):
                    logits = model(precision.images(inputs))
            else:
                logits = model(inputs)
            probs = F.interpolate(logits.float(), size=work_size, mode="bilinear", align_corners=False).softmax(1)
            view_sum = probs[:batch] + probs[batch:].flip(-1) if flip else probs
            total = view_sum if total is None else total + view_sum
        mean = total / (len(scales) * (2 if flip else 1))
        if work_size != size and full_size:
            mean = upsample_probs(mean, size)
    # a channels-last model (prepare_for_inference) gives channels-last maps; callers get the usual layout
    return mean.contiguous()


def upsample_probs(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Probabilities [B, C, h, w] bilinearly resized to ``size`` (H, W); unchanged when they have it."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    return F.interpolate(probs, size=tuple(size), mode="bilinear", align_corners=False)


def predict_probs(model: nn.Module, image: np.ndarray, scales: Sequence[float] = (1.0,), flip: bool = True,
                  device: torch.device | str = "cpu", max_side: int | None = None, full_size: bool = True
                  ) -> np.ndarray:
    """Class probabilities of one RGB uint8 [H, W, 3] image (:func:`segment_batch` of a batch of one).

    Returns:
        float32 [C, H, W] probabilities summing to 1 over C (at :func:`shrunk_size` with ``full_size=False``).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got {image.shape}")
    was_training = model.training
    model.eval()
    try:
        probs = segment_batch(model, normalize_image(image)[None].to(device), scales, flip, max_side=max_side,
                              full_size=full_size)
    finally:
        model.train(was_training)
    return probs[0].cpu().numpy().astype(np.float32)


def predict_label(model: nn.Module, image: np.ndarray, scales: Sequence[float] = (1.0,), flip: bool = True,
                  crf: CrfParams | None = None, device: torch.device | str = "cpu",
                  max_side: int | None = None) -> np.ndarray:
    """Label map of one RGB uint8 [H, W, 3] image: the argmax of :func:`predict_probs`, or with ``crf``
    the labels of :func:`wsss.crf.crf_label` (at the ``max_side`` size, scaled up).

    The one-image form of what ``wsss predict`` computes in batches.

    Returns:
        uint8 [H, W] class indices.
    """
    if crf is not None:
        probs = predict_probs(model, image, scales, flip, device=device, max_side=max_side, full_size=False)
        return crf_label(image, probs, crf)
    probs = predict_probs(model, image, scales=scales, flip=flip, device=device, max_side=max_side)
    return probs.argmax(0).astype(np.uint8)


def evaluate_model(model: nn.Module, dataset, split: str, device: torch.device, info, precision=None,
                   workers: int = 0, batch_size: int = 4):
    """Confusion matrix of single-scale full-resolution predictions on ``split``, summed over ranks.

    The validation of ``wsss train-seg``.  Each process predicts its share of the images; counts stay
    on the device until the one sum.  ``dataset``: a :class:`wsss.datasets.prepared.PreparedDataset`;
    ``info``: a :class:`wsss.device.DistInfo`; ``precision``: a :class:`wsss.training.Precision`
    (default float32).

    Returns:
        a :class:`wsss.metrics.ConfusionMatrix`.
    """
    from wsss.device import shard, sum_array_over_ranks
    from wsss.inference import split_batches, to_model_input
    from wsss.metrics import ConfusionMatrix, confusion_counts
    from wsss.training import Precision

    precision = precision or Precision()
    was_training = model.training
    model.eval()
    counts = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64, device=device)
    for _, images, masks in split_batches(dataset, split, shard(dataset.ids(split), info), batch_size=batch_size,
                                          workers=workers, device=device, masks=True):
        probs = segment_batch(model, to_model_input(images), scales=(1.0,), flip=False, precision=precision)
        counts += confusion_counts(masks, probs.argmax(1), dataset.num_classes)
    model.train(was_training)
    return ConfusionMatrix(dataset.num_classes).add_counts(sum_array_over_ranks(counts.cpu().numpy(), info, device))
