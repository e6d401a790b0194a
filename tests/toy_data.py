"""A tiny separable dataset for the "it learns" tests of the training stages (importable from tests/).

Red squares (class 1) and blue discs (class 2) on a noisy grey background.  Every image holds one
object, or one of each; sizes and places are random.  ``upright`` makes the background brighter at
the top than at the bottom, so that "which way is up" can be told from any crop (what rotation
pretraining learns; squares and discs alone look the same turned by a quarter).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsss import artifacts
from wsss.datasets.prepared import SplitSpec, write_prepared

CLASSES = ["background", "square", "disc"]
COLOURS = {1: (220, 40, 40), 2: (40, 40, 220)}
# the background: mean grey (at the top and bottom rows with ``upright``) and the noise around it
GREY, TOP_GREY, BOTTOM_GREY, NOISE = 128, 190, 70, 20


def toy_image(rng: np.random.Generator, size: int, classes: list[int], *,
              upright: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One image and its mask: ``classes`` (1 square, 2 disc) drawn at random places, apart.

    Returns:
        ``(image, mask)``: uint8 [size, size, 3] RGB and uint8 [size, size] (0 background, 1, 2).
    """
    grey = np.linspace(TOP_GREY, BOTTOM_GREY, size) if upright else np.full(size, GREY)
    image = np.clip(grey[:, None, None] + rng.normal(0, NOISE, (size, size, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for cls in classes:
        side = int(rng.integers(size * 3 // 10, size * 9 // 20 + 1))
        for _ in range(100):  # a place two pixels away from any object drawn before
            top, left = rng.integers(1, size - side, 2)
            if not mask[max(0, top - 2):top + side + 2, max(0, left - 2):left + side + 2].any():
                break
        if cls == 1:
            mask[top:top + side, left:left + side] = 1
        else:
            radius = side / 2
            mask[(yy - top - radius + 0.5) ** 2 + (xx - left - radius + 0.5) ** 2 <= radius ** 2] = 2
    for cls, colour in COLOURS.items():
        image[mask == cls] = colour
    return image, mask


def make_toy_dataset(root: str | Path, *, num_train: int = 24, num_val: int = 8, size: int = 48,
                     upright: bool = False, seed: int = 0) -> dict[str, list[str]]:
    """Write a prepared toy dataset (``folder`` kind, PNG images and masks) under ``root``.

    Image ``i`` of a split holds a square (``i % 3 == 0``), a disc (``1``) or both (``2``): each class
    is in two thirds of the images, and every split has all three kinds.

    Returns:
        ``{"train": ids, "val": ids}``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits, labels = {}, {}
    for split, count in (("train", num_train), ("val", num_val)):
        splits[split] = [f"{split}{index:03d}" for index in range(count)]
        for index, image_id in enumerate(splits[split]):
            classes = [[1], [2], [1, 2]][index % 3]
            image, mask = toy_image(rng, size, classes, upright=upright)
            artifacts.write_image(root / "images" / f"{image_id}.png", image)
            artifacts.write_label_png(root / "masks" / f"{image_id}.png", mask)
            labels[image_id] = classes
    spec = SplitSpec(image_dir="images", image_ext=".png", mask_dir="masks")
    write_prepared(root, "folder", CLASSES, {name: (spec, ids) for name, ids in splits.items()}, labels)
    return splits


def read_masks(root: str | Path, ids: list[str]) -> dict[str, np.ndarray]:
    """The ground-truth masks of ``ids``: uint8 [H, W] each."""
    return {image_id: artifacts.read_label_png(Path(root) / "masks" / f"{image_id}.png") for image_id in ids}


def trivial_mious(masks: dict[str, np.ndarray], num_classes: int = len(CLASSES)) -> dict[str, float]:
    """The mIoU of two labellings that need no learning, scored on ``masks``: the floors of the tests.

    ``background``: every pixel background (an empty CAM, a network that never fires);
    ``whole_image``: every pixel of an image its first present class (a CAM covering the whole image:
    ``cam_to_label`` turns equal CAMs into the first key, at any threshold below 1).

    Args:
        masks: id -> uint8 [H, W] ground truth (0 background, classes, 255 ignored).
    """
    from wsss.metrics import ConfusionMatrix

    background, whole_image = ConfusionMatrix(num_classes), ConfusionMatrix(num_classes)
    for mask in masks.values():
        present = mask[(mask > 0) & (mask < 255)]
        background.update(mask, np.zeros_like(mask))
        whole_image.update(mask, np.full_like(mask, present.min() if present.size else 0))
    return {"background": background.miou(), "whole_image": whole_image.miou()}
