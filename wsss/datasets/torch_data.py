"""torch ``Dataset`` views of a :class:`~wsss.datasets.prepared.PreparedDataset`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from wsss import artifacts
from wsss.datasets.prepared import PreparedDataset
from wsss.errors import WsssError


class ClassificationDataset(Dataset):
    """Items ``(image float32 [3, H, W], target float32 [C - 1])`` with multi-hot image-level labels."""

    def __init__(self, dataset: PreparedDataset, split: str, transform: Callable, ids: list[str] | None = None):
        self.dataset, self.split, self.transform = dataset, split, transform
        self.ids = list(ids) if ids is not None else dataset.ids(split)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image, _ = self.transform(self.dataset.read_image(self.split, image_id), None)
        return image, torch.from_numpy(self.dataset.multi_hot(image_id))


class SegmentationDataset(Dataset):
    """Items ``(image float32 [3, H, W], mask int64 [H, W])``.

    Args:
        label_dir: folder of pseudo-label PNGs named ``<id>.png``; ``None`` uses the
            dataset's ground-truth masks (the fully supervised upper bound).
        reliability_dir: optional folder of reliability maps; items then carry a
            third element, float32 [H, W], transformed like the mask.
    """

    def __init__(self, dataset: PreparedDataset, split: str, transform: Callable, label_dir: str | Path | None = None,
                 reliability_dir: str | Path | None = None, ids: list[str] | None = None):
        self.dataset, self.split, self.transform = dataset, split, transform
        self.label_dir = None if label_dir is None else Path(label_dir)
        self.reliability_dir = None if reliability_dir is None else Path(reliability_dir)
        self.ids = list(ids) if ids is not None else dataset.ids(split)
        if self.label_dir is None and not dataset.has_masks(split):
            raise WsssError(f"split {split!r} of {dataset.root} has no ground-truth masks to train on")

    def __len__(self) -> int:
        return len(self.ids)

    def read_label(self, image_id: str, shape: tuple[int, int]) -> np.ndarray:
        if self.label_dir is None:
            return self.dataset.read_mask(self.split, image_id, shape)
        path = artifacts.label_path(self.label_dir, image_id)
        label = artifacts.read_label_png(path, self.dataset.num_classes)
        if label.shape != shape:
            raise WsssError(f"{path}: label map is {label.shape[1]}x{label.shape[0]}, image is {shape[1]}x{shape[0]}")
        return label

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image = self.dataset.read_image(self.split, image_id)
        label = self.read_label(image_id, image.shape[:2])
        if self.reliability_dir is None:
            return self.transform(image, label)
        path = artifacts.reliability_path(self.reliability_dir, image_id)
        weight = artifacts.read_reliability(path)
        if weight.shape != label.shape:
            raise WsssError(f"{path}: reliability map shape {weight.shape} differs from label shape {label.shape}")
        return self._transform_with_weight(image, label, weight)

    def _transform_with_weight(self, image, label, weight):
        # Label and weight travel as one float [H, W, 2] "mask" so that every geometric
        # transform (nearest-neighbour for masks) moves them together; padding fills both
        # channels with 255, and padded or ignored pixels get weight 0.
        stacked = np.dstack([label.astype(np.float32), weight.astype(np.float32)])
        image_t, stacked_t = self.transform(image, stacked)
        label_out = stacked_t[..., 0].round().long()
        weight_out = stacked_t[..., 1].float().clone()
        weight_out[label_out == artifacts.IGNORE_INDEX] = 0.0
        return image_t, label_out, weight_out


class AffinityDataset(Dataset):
    """Items ``(image float32 [3, S, S], pair targets bool [3, P, S/8, S/8])`` for the affinity network.

    The confident-region labels (``<id>.png`` in ``label_dir``: 0 background, class, 255 not sure)
    are augmented with the image, read on the stride-8 grid and turned into the bg-positive,
    fg-positive and negative pair masks of :func:`wsss.affinity.affinity_targets` (in that order).
    """

    def __init__(self, dataset: PreparedDataset, split: str, transform: Callable, label_dir: str | Path, offsets,
                 stride: int = 8):
        self.labels = SegmentationDataset(dataset, split, transform, label_dir=label_dir)
        self.offsets, self.stride = offsets, stride

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from wsss.affinity import TARGET_KINDS, affinity_targets, label_at_stride

        image, label = self.labels[index]
        grid_label = label_at_stride(label.numpy().astype(np.uint8), self.stride)
        targets = affinity_targets(grid_label, self.offsets)
        return image, torch.from_numpy(np.stack([targets[kind] for kind in TARGET_KINDS]))


class InferenceDataset(Dataset):
    """Items ``{"id": str, "image": RGB uint8 [H, W, 3], "size": (H, W)}`` at original size (batch size 1)."""

    def __init__(self, dataset: PreparedDataset, split: str, ids: list[str] | None = None):
        self.dataset, self.split = dataset, split
        self.ids = list(ids) if ids is not None else dataset.ids(split)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = self.dataset.read_image(self.split, image_id)
        return {"id": image_id, "image": image, "size": image.shape[:2]}


def collate_single(items: list[dict]) -> dict:
    """Collate for InferenceDataset with batch size 1: return the item itself."""
    if len(items) != 1:
        raise ValueError("InferenceDataset is used with batch_size=1 (images differ in size)")
    return items[0]
