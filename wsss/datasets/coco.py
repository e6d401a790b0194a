"""MS-COCO 2014 instance annotations turned into class-index masks and image-level labels.

Layout read here::

    COCO/
        annotations/instances_<split>.json
        <split>/<file_name>                   e.g. train2014/COCO_train2014_000000000009.jpg

and written::

    COCO/SegmentationClass/<split>/<id>.png   id = image file name without extension

Classes follow ``data/coco.txt`` (background, then the 80 categories in
category-id order); the JSON's categories are matched by name.  Each mask is
drawn object by object in order of decreasing area, so a smaller object lying
on a larger one (a cup on a dining table) stays visible instead of being
painted over.  Crowd regions (``iscrowd = 1``) are drawn last, as 255
(ignore): they hold an unknown number of unlabelled instances and possibly
other classes, so neither the crowd's class nor the class underneath is
trustworthy there and the pixels are excluded from training and evaluation.

Image-level labels are the categories of the non-crowd objects.  Images
without any such object (no annotation, or crowds only) carry no label for a
multi-label classifier, so they are left out of the split list (as is usual
in WSSS on COCO); their number is reported.

Polygons and RLEs are decoded with ``pycocotools.mask``.  The JSON is read
with :mod:`json` rather than ``pycocotools.coco.COCO``, which only adds an
index and prints to stdout.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsss import artifacts
from wsss.classes import builtin_classes
from wsss.datasets.common import image_size, split_spec_for
from wsss.parallel import imap_images
from wsss.datasets.prepared import write_prepared
from wsss.errors import WsssError

logger = logging.getLogger(__name__)

MASK_ROOT = "SegmentationClass"


def annotation_file(root: str | Path, split: str) -> Path:
    """Return ``<root>/annotations/instances_<split>.json``."""
    return Path(root) / "annotations" / f"instances_{split}.json"


def mask_dir(split: str) -> str:
    """Return the mask folder of a split, relative to the COCO root."""
    return f"{MASK_ROOT}/{split}"


def category_classes(categories: list[dict], classes: list[str], json_path: Path) -> dict[int, int]:
    """Map COCO category ids to class indices of ``classes`` by category name.

    Raises:
        WsssError: naming ``json_path`` if a category name is not in ``classes``.
    """
    index = {name: position for position, name in enumerate(classes)}
    mapping = {}
    for category in categories:
        name = category.get("name")
        if name not in index or index[name] == 0:
            raise WsssError(f"{json_path}: category {name!r} (id {category.get('id')}) is not one of the "
                            f"{len(classes) - 1} COCO classes of data/coco.txt")
        mapping[int(category["id"])] = index[name]
    return mapping


def segmentation_rle(segmentation, height: int, width: int) -> dict | None:
    """Return the (compressed) RLE of a COCO segmentation: polygons, uncompressed or compressed RLE.

    Returns None for an empty polygon list.  Polygons with fewer than 3 points are
    dropped (pycocotools would read a 4-number list as a box).
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polygons = [polygon for polygon in segmentation if len(polygon) >= 6]
        if not polygons:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, height, width)
        counts = segmentation["counts"]
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        return {"size": list(segmentation["size"]), "counts": counts}
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")


@dataclass(frozen=True)
class _CocoObject:
    class_index: int
    segmentation: object
    crowd: bool
    area: float | None
    annotation_id: int


@dataclass(frozen=True)
class _CocoTask:
    image_id: str
    image: Path
    out: Path
    height: int
    width: int
    objects: tuple[_CocoObject, ...]
    json_path: Path


def draw_mask(objects: tuple[_CocoObject, ...], height: int, width: int) -> np.ndarray:
    """Rasterise the objects of one image into a class-index mask uint8 [H, W].

    Non-crowd objects are drawn by decreasing area (ties: annotation id), so smaller
    ones end up on top; crowd regions are drawn last as 255.
    """
    from pycocotools import mask as mask_utils

    decoded = []
    for obj in objects:
        rle = segmentation_rle(obj.segmentation, height, width)
        if rle is None:
            continue
        area = float(obj.area) if obj.area is not None else float(mask_utils.area(rle))
        decoded.append((obj.crowd, -area, obj.annotation_id, obj.class_index, rle))
    label = np.zeros((height, width), dtype=np.uint8)
    with warnings.catch_warnings():
        # pycocotools' compiled decoder trips NumPy 2's __array__(copy=...) deprecation; the result is right
        warnings.simplefilter("ignore", DeprecationWarning)
        for crowd, _, _, class_index, rle in sorted(decoded, key=lambda item: item[:3]):
            label[mask_utils.decode(rle) > 0] = artifacts.IGNORE_INDEX if crowd else class_index
    return label


def _write_mask(task: _CocoTask, overwrite: bool) -> bool:
    """Write one image's mask; return False when a valid one was already there."""
    if not task.image.is_file():
        raise WsssError(f"{task.image}: image listed in {task.json_path} not found")
    actual = image_size(task.image)
    if actual != (task.height, task.width):
        raise WsssError(f"{task.image}: image is {actual[1]}x{actual[0]} but {task.json_path.name} says "
                        f"{task.width}x{task.height}")
    if not overwrite and task.out.is_file():
        try:
            if artifacts.read_label_png(task.out).shape == (task.height, task.width):
                return False
        except WsssError:
            pass  # unreadable leftover: draw it again
    try:
        label = draw_mask(task.objects, task.height, task.width)
    except (ValueError, TypeError, KeyError) as err:
        raise WsssError(f"{task.json_path}: bad segmentation for image {task.image.name} ({err})") from None
    artifacts.write_label_png(task.out, label)
    return True


def _read_instances(json_path: Path) -> dict:
    if not json_path.is_file():
        raise WsssError(f"{json_path}: COCO annotation file not found")
    data = artifacts.read_json(json_path)
    if not isinstance(data, dict) or any(key not in data for key in ("images", "annotations", "categories")):
        raise WsssError(f"{json_path}: not a COCO instances file (needs 'images', 'annotations' and 'categories')")
    return data


def prepare_coco(root: str | Path, split: str, *, workers: int | None = None, overwrite: bool = False) -> dict:
    """Prepare one COCO split: masks in ``SegmentationClass/<split>/`` and labels under ``<root>/wsss/``.

    Args:
        root: the COCO folder holding ``annotations/`` and ``<split>/``.
        split: ``train2014`` or ``val2014`` (any name with an ``instances_<split>.json`` works).
        workers: processes drawing masks (None = all cores).
        overwrite: redraw masks that already exist and are valid.

    Returns:
        Summary ``{"split", "images_in_json", "images", "dropped_without_labels", "masks_written",
        "masks_skipped", "crowd_annotations"}``.

    Raises:
        WsssError: naming the file for a missing root, JSON or image, an unknown category,
            an image whose size differs from the JSON, or an undecodable segmentation.
    """
    root = Path(root)
    if not root.is_dir():
        raise WsssError(f"{root}: COCO root not found")
    json_path = annotation_file(root, split)
    data = _read_instances(json_path)
    classes = builtin_classes("coco")
    category_to_class = category_classes(data["categories"], classes, json_path)

    try:
        images = {int(image["id"]): image for image in data["images"]}
        objects = defaultdict(list)
        for ann in data["annotations"]:
            image_key = int(ann["image_id"])
            if image_key not in images:
                raise WsssError(f"{json_path}: annotation {ann.get('id')} refers to unknown image id {image_key}")
            if int(ann["category_id"]) not in category_to_class:
                raise WsssError(f"{json_path}: annotation {ann.get('id')} has unknown category id {ann['category_id']}")
            objects[image_key].append(_CocoObject(category_to_class[int(ann["category_id"])], ann["segmentation"],
                                                  bool(ann.get("iscrowd", 0)), ann.get("area"), int(ann.get("id", 0))))
    except (KeyError, TypeError, ValueError) as err:
        raise WsssError(f"{json_path}: malformed COCO entry (missing or bad {err})") from None

    tasks, labels, file_names = [], {}, {}
    dropped = 0
    for image_key, image in sorted(images.items()):
        present = sorted({obj.class_index for obj in objects[image_key] if not obj.crowd})
        if not present:
            dropped += 1
            continue
        file_name = str(image["file_name"])
        image_id = Path(file_name).stem
        if image_id in labels:
            raise WsssError(f"{json_path}: two images named {image_id!r}")
        labels[image_id], file_names[image_id] = present, file_name
        tasks.append(_CocoTask(image_id, root / split / file_name,
                               artifacts.label_path(root / mask_dir(split), image_id),
                               int(image["height"]), int(image["width"]), tuple(objects[image_key]), json_path))
    if not tasks:
        raise WsssError(f"{json_path}: no image has a non-crowd annotation")
    if dropped:
        logger.warning("%s: %d of %d images have no non-crowd annotation and are left out of split %s",
                       json_path.name, dropped, len(images), split)

    written = sum(imap_images(functools.partial(_write_mask, overwrite=overwrite), tasks, workers,
                              desc=f"coco {split}"))
    spec = split_spec_for(split, file_names, mask_dir(split))
    write_prepared(root, "coco", classes, {split: (spec, list(labels))}, labels, overwrite=overwrite)
    return {"root": str(root), "split": split, "images_in_json": len(images), "images": len(tasks),
            "dropped_without_labels": dropped, "masks_written": written, "masks_skipped": len(tasks) - written,
            "crowd_annotations": sum(obj.crowd for group in objects.values() for obj in group)}
