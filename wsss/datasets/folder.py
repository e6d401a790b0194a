"""A user's own dataset: a folder of images, a CSV of image-level labels and a class list.

Inputs::

    images/            the images (any format OpenCV reads; extensions may be mixed)
    labels.csv         header ``image,labels``; ``image`` is a file name in images/,
                       ``labels`` the class names present, separated by ``;``
                       (empty = background only: allowed, with a warning)
    classes.txt        one class name per line; ``background`` is prepended
                       when the first line is not ``background``
    masks/ (optional)  ``<image stem>.png`` class-index masks for evaluation

:func:`prepare_folder` checks every row and decodes every image once (so a
corrupt file fails here and not hours into training), then writes the split
list and labels through :func:`wsss.datasets.prepared.write_prepared`.
"""

from __future__ import annotations

import csv
import functools
import logging
from pathlib import Path
from typing import NamedTuple

from wsss import artifacts
from wsss.classes import read_class_file
from wsss.datasets.common import dataset_relative, label_classes, split_spec_for
from wsss.datasets.prepared import write_prepared
from wsss.errors import WsssError
from wsss.parallel import imap_images

logger = logging.getLogger(__name__)

BACKGROUND = "background"
LABEL_SEPARATOR = ";"
CSV_COLUMNS = ("image", "labels")



def read_folder_classes(path: str | Path) -> list[str]:
    """Read a class list, prepending ``background`` when the first line is not ``background``.

    Returns:
        The class names, background first (index 0), at most 255 of them (255 is the ignore value).
    """
    path = Path(path)
    names = read_class_file(path)
    if names[0] != BACKGROUND:
        if BACKGROUND in names:
            raise WsssError(f"{path}: {BACKGROUND!r} must be the first line (class index 0) or absent")
        names = [BACKGROUND] + names
    if len(names) > artifacts.IGNORE_INDEX:
        raise WsssError(f"{path}: {len(names)} classes with background; masks are uint8 with 255 = ignore, "
                        f"so at most {artifacts.IGNORE_INDEX} are possible")
    return names


class LabelRow(NamedTuple):
    """One row of ``labels.csv``."""

    file_name: str
    labels: list[int]  # sorted foreground class indices
    line: int          # line number in the CSV (the header is line 1)


def read_labels_csv(path: str | Path, classes: list[str]) -> dict[str, LabelRow]:
    """Read ``labels.csv`` into ``{image id: LabelRow}`` in file order.

    The image id is the file name without its extension.  ``background`` in the
    labels column is accepted and means nothing (labels are foreground classes).

    Raises:
        WsssError: naming the CSV and the line of a malformed row, an unknown class name,
            a file name with a folder part or a duplicated image id.
    """
    path = Path(path)
    index = {name: position for position, name in enumerate(classes)}
    rows: dict[str, LabelRow] = {}
    known = ", ".join(classes[1:11]) + (", ..." if len(classes) > 11 else "")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, skipinitialspace=True)
            header = [name.strip() for name in reader.fieldnames or []]
            if header != list(CSV_COLUMNS):
                raise WsssError(f"{path}: header must be 'image,labels', got {','.join(header) or 'nothing'!r}")
            reader.fieldnames = header
            for row in reader:
                line = reader.line_num
                where = f"{path}, line {line}"
                if None in row:  # DictReader files surplus fields under the key None
                    raise WsssError(f"{where}: {2 + len(row[None])} fields, expected 2 (image,labels); "
                                    f"separate class names with {LABEL_SEPARATOR!r}")
                if row["labels"] is None:
                    raise WsssError(f"{where}: 1 field, expected 2 (image,labels)")
                file_name = row["image"].strip()
                if not file_name:
                    raise WsssError(f"{where}: empty image name")
                if "/" in file_name or "\\" in file_name or file_name in (".", ".."):
                    raise WsssError(f"{where}: image {file_name!r} must be a file name inside the images folder")
                labels = set()
                for name in (part.strip() for part in row["labels"].split(LABEL_SEPARATOR)):
                    if not name or name == BACKGROUND:
                        continue
                    if name not in index:
                        raise WsssError(f"{where}: unknown class {name!r} (classes: {known})")
                    labels.add(index[name])
                image_id = Path(file_name).stem
                if image_id in rows:
                    raise WsssError(f"{where}: image id {image_id!r} already used on line {rows[image_id].line} "
                                    "(ids are file names without extension)")
                rows[image_id] = LabelRow(file_name, sorted(labels), line)
    except OSError as err:
        raise WsssError(f"{path}: cannot read labels file ({err.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as err:
        raise WsssError(f"{path}: not a readable CSV file ({err})") from None
    if not rows:
        raise WsssError(f"{path}: no images listed")
    return rows


def _check_image(task: tuple[str, Path, Path | None, str], num_classes: int) -> tuple[str, list[int] | None]:
    """Decode one image (and its mask); return ``(id, mask classes or None)``."""
    image_id, image_path, mask_path, listed_at = task
    if not image_path.is_file():
        raise WsssError(f"{image_path}: image listed in {listed_at} not found")
    image = artifacts.read_image(image_path)
    if mask_path is None:
        return image_id, None
    if not mask_path.is_file():
        raise WsssError(f"{mask_path}: mask of image {image_path.name} not found")
    mask = artifacts.read_label_png(mask_path)
    if mask.shape != image.shape[:2]:
        raise WsssError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but the image "
                        f"{image_path.name} is {image.shape[1]}x{image.shape[0]}")
    return image_id, label_classes(mask, num_classes, mask_path)


def prepare_folder(images: str | Path, labels_csv: str | Path, classes_file: str | Path, *,
                   masks: str | Path | None = None, split: str = "train", root: str | Path | None = None,
                   workers: int | None = None, overwrite: bool = False) -> dict:
    """Prepare a folder dataset as split ``split`` under ``root`` (default: the parent of ``images``).

    Args:
        images: folder of the images named in the CSV.
        labels_csv: ``image,labels`` CSV (see the module docstring).
        classes_file: class list, one name per line.
        masks: optional folder of ``<id>.png`` masks; every listed image must have one.
        split: name of the split written.
        root: dataset root holding ``wsss/``; image and mask folders are stored relative to it.
        workers: processes that decode images (None = all cores).
        overwrite: replace what an earlier prepare under ``root`` wrote when it disagrees (another class
            list, another label for an image id); without it that is an error.

    Returns:
        Summary ``{"split", "images", "with_masks", "without_labels", "mask_label_mismatches"}``.

    Raises:
        WsssError: naming the file (and CSV line) of any bad input.
    """
    images = Path(images)
    if not images.is_dir():
        raise WsssError(f"{images}: images folder not found")
    masks = Path(masks) if masks is not None else None
    if masks is not None and not masks.is_dir():
        raise WsssError(f"{masks}: masks folder not found")
    root = Path(root) if root is not None else images.resolve().parent
    if not split or any(char in split for char in "/\\") or split.startswith("."):
        raise WsssError(f"--split {split!r}: not a valid split name")
    classes = read_folder_classes(classes_file)
    rows = read_labels_csv(labels_csv, classes)

    tasks = [(image_id, images / row.file_name, masks / f"{image_id}.png" if masks is not None else None,
              f"{labels_csv}, line {row.line}") for image_id, row in rows.items()]
    check = functools.partial(_check_image, num_classes=len(classes))
    mismatches = 0
    for image_id, mask_labels in imap_images(check, tasks, workers, desc=f"check {split}"):
        if mask_labels is not None and mask_labels != rows[image_id].labels:
            mismatches += 1
    if mismatches:
        logger.warning("%d of %d images: the classes in the mask differ from the labels in %s",
                       mismatches, len(rows), labels_csv)
    without_labels = sum(1 for row in rows.values() if not row.labels)
    if without_labels:
        logger.warning("%d of %d images in %s have no labels (background only)", without_labels, len(rows),
                       labels_csv)

    spec = split_spec_for(dataset_relative(images, root), {key: row.file_name for key, row in rows.items()},
                          dataset_relative(masks, root) if masks is not None else None)
    write_prepared(root, "folder", classes, {split: (spec, list(rows))},
                   {image_id: row.labels for image_id, row in rows.items()}, overwrite=overwrite)
    return {"root": str(root), "split": split, "classes": len(classes), "images": len(rows),
            "with_masks": len(rows) if masks is not None else 0, "without_labels": without_labels,
            "mask_label_mismatches": mismatches}
