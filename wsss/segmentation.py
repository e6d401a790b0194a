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

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsss.artifacts import IGNORE_INDEX
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


def predict_probs(model: nn.Module, image: np.ndarray, scales: Sequence[float] = (1.0,), flip: bool = True,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """Class probabilities of one image, averaged over scales and horizontal flips.

    Each scale resizes the image (bilinear), runs the image and its mirror as
    one batch of two, upsamples the logits to the original size, and averages
    the softmax probabilities of all views.

    Args:
        model: maps float [B, 3, h, w] to logits [B, C, h, w]; put into eval mode for the call.
        image: RGB uint8 [H, W, 3].
        scales: resize factors (1.0 = original size).
        flip: also use the horizontally flipped image.
        device: where the model lives.

    Returns:
        float32 [C, H, W] probabilities summing to 1 over C.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got {image.shape}")
    if not scales:
        raise ValueError("need at least one scale")
    height, width = image.shape[:2]
    was_training = model.training
    model.eval()
    total = None
    try:
        with torch.inference_mode():
            for scale in scales:
                size = (max(1, round(height * scale)), max(1, round(width * scale)))
                resized = image if size == (height, width) else cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
                batch = normalize_image(resized).unsqueeze(0)
                if flip:
                    batch = torch.cat([batch, batch.flip(-1)])
                logits = model(batch.to(device))
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
                probs = logits.float().softmax(1)
                view_sum = probs[0] + probs[1].flip(-1) if flip else probs[0]
                total = view_sum if total is None else total + view_sum
    finally:
        model.train(was_training)
    views = len(scales) * (2 if flip else 1)
    return (total / views).cpu().numpy().astype(np.float32)

