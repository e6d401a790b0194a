"""Joint image + mask transforms.

Every transform is a callable ``(image, mask) -> (image, mask)`` where
``image`` is RGB uint8 [H, W, 3] (numpy) and ``mask`` is uint8 [H, W], a
float [H, W, C] stack of per-pixel maps (label + reliability) or ``None``,
until :class:`Normalize` turns them into tensors (float32 [3, H, W]; int64
[H, W] for a mask, float32 [H, W, C] for a stack).  Randomness comes from Python's ``random`` module, which
torch seeds per DataLoader worker, so a run is reproducible under ``--seed``.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from wsss.artifacts import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, mask=None):
        for transform in self.transforms:
            image, mask = transform(image, mask)
        return image, mask


def resize_pair(image: np.ndarray, mask: np.ndarray | None, size: tuple[int, int]):
    """Resize to ``size`` (H, W): bilinear for the image, nearest for the mask."""
    height, width = size
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    if mask is not None:
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
    return image, mask


class RandomRescale:
    """Rescale both sides by one factor drawn uniformly from ``[min_scale, max_scale]``."""

    def __init__(self, min_scale: float = 0.5, max_scale: float = 1.5):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale = min_scale, max_scale

    def __call__(self, image, mask=None):
        scale = random.uniform(self.min_scale, self.max_scale)
        height, width = image.shape[:2]
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        return resize_pair(image, mask, size)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, mask=None):
        if random.random() < self.p:
            image = np.ascontiguousarray(image[:, ::-1])
            mask = None if mask is None else np.ascontiguousarray(mask[:, ::-1])
        return image, mask


class ColorJitter:
    """Random brightness, contrast and saturation factors in ``[1 - s, 1 + s]``."""

    def __init__(self, brightness: float = 0.3, contrast: float = 0.3, saturation: float = 0.3):
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    def __call__(self, image, mask=None):
        out = image.astype(np.float32)
        out *= random.uniform(1 - self.brightness, 1 + self.brightness)
        mean = out.mean()
        out = (out - mean) * random.uniform(1 - self.contrast, 1 + self.contrast) + mean
        grey = out.mean(axis=2, keepdims=True)
        out = (out - grey) * random.uniform(1 - self.saturation, 1 + self.saturation) + grey
        return np.clip(out, 0, 255).astype(np.uint8), mask


class RandomCrop:
    """Random ``size x size`` crop; smaller inputs are padded first.

    The image is padded with the ImageNet mean colour (0 after normalisation)
    and the mask with ``ignore_index``, so padding never counts as background.
    """

    def __init__(self, size: int, ignore_index: int = IGNORE_INDEX):
        self.size = size
        self.ignore_index = ignore_index

    def __call__(self, image, mask=None):
        height, width = image.shape[:2]
        pad_h, pad_w = max(self.size - height, 0), max(self.size - width, 0)
        if pad_h or pad_w:
            fill = tuple(round(255 * m) for m in IMAGENET_MEAN)
            image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=fill)
            if mask is not None:
                channels = 1 if mask.ndim == 2 else mask.shape[2]
                mask = cv2.copyMakeBorder(mask, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT,
                                          value=(self.ignore_index,) * channels)
                if channels == 1 and mask.ndim == 3:
                    mask = mask[..., 0]
            height, width = image.shape[:2]
        top = random.randint(0, height - self.size)
        left = random.randint(0, width - self.size)
        image = image[top:top + self.size, left:left + self.size]
        if mask is not None:
            mask = mask[top:top + self.size, left:left + self.size]
        return np.ascontiguousarray(image), None if mask is None else np.ascontiguousarray(mask)


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> float32 tensor [3, H, W] standardised with ImageNet mean/std."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return tensor.sub_(mean).div_(std)


def denormalize_image(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`normalize_image`: float [3, H, W] -> RGB uint8 [H, W, 3]."""
    mean = torch.tensor(IMAGENET_MEAN, device=tensor.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=tensor.device).view(3, 1, 1)
    image = (tensor * std + mean).clamp(0, 1).mul(255).round().byte()
    return image.permute(1, 2, 0).cpu().numpy()


class Normalize:
    """To tensors: image float32 [3, H, W] (ImageNet-standardised), mask int64 [H, W] (a stack stays float)."""

    def __call__(self, image, mask=None):
        tensor = normalize_image(image)
        if mask is not None:
            mask = torch.from_numpy(np.ascontiguousarray(mask))
            mask = mask.long() if mask.ndim == 2 else mask.float()
        return tensor, mask


def train_preset(*, crop_size: int, scale_range: tuple[float, float] = (0.5, 1.5), flip: bool = True,
                 jitter: bool = True) -> Compose:
    """Training augmentation: rescale, flip, colour jitter, normalise, crop (mask padded with 255)."""
    steps: list[Callable] = [RandomRescale(*scale_range)]
    if flip:
        steps.append(RandomHorizontalFlip())
    if jitter:
        steps.append(ColorJitter())
    steps += [RandomCrop(crop_size), Normalize()]
    return Compose(steps)


def eval_preset() -> Compose:
    """Evaluation: no geometry change, only normalisation."""
    return Compose([Normalize()])
