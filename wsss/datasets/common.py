"""Helpers shared by the dataset readers (VOC, COCO, folder)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsss import artifacts
from wsss.datasets.prepared import SplitSpec
from wsss.errors import WsssError


def label_classes(label: np.ndarray, num_classes: int, path: Path) -> list[int]:
    """Return the foreground class indices of a label map uint8 [H, W] (sorted).

    Raises:
        WsssError: naming ``path`` if a value is neither a class index (< ``num_classes``) nor 255.
    """
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != artifacts.IGNORE_INDEX)]
    if bad.size:
        raise WsssError(f"{path}: mask holds class index {int(bad.max())} outside 0..{num_classes - 1} and 255")
    return [int(value) for value in values if 0 < value < num_classes]


def image_size(path: Path) -> tuple[int, int]:
    """Return (H, W) of an image from its header only (no decoding)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        raise WsssError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise WsssError(f"{path}: not a readable image ({err})") from None
    return height, width


def dataset_relative(path: Path, root: Path) -> str:
    """Return ``path`` relative to ``root`` (POSIX form) when it lies inside, else absolute."""
    path, root = path.resolve(), root.resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def split_spec_for(image_dir: str, file_names: dict[str, str], mask_dir: str | None) -> SplitSpec:
    """Build a :class:`SplitSpec` whose ``image_ext`` is the most common extension.

    Files not named ``<id><image_ext>`` (mixed extensions) are listed in ``image_files``,
    which stays None when there are none.

    Args:
        image_dir: folder of the images, relative to the dataset root.
        file_names: image id -> file name inside ``image_dir``.
        mask_dir: folder of ``<id>.png`` masks, or None.
    """
    extensions = collections.Counter(Path(name).suffix for name in file_names.values())
    common = extensions.most_common(1)[0][0] if extensions else ".jpg"
    others = {image_id: name for image_id, name in file_names.items() if name != f"{image_id}{common}"}
    return SplitSpec(image_dir=image_dir, image_ext=common, mask_dir=mask_dir, image_files=others or None)
