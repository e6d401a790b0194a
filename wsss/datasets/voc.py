"""PASCAL VOC 2012 (devkit layout), optionally augmented with SBD (Hariharan et al., ICCV 2011).

Devkit layout read here::

    VOCdevkit/VOC2012/
        JPEGImages/<id>.jpg
        Annotations/<id>.xml
        SegmentationClass/<id>.png                 palette PNG, 0 = background, 255 = ignore
        ImageSets/Segmentation/{train,val}.txt     (trainval.txt is prepared too when present)

SBD (``benchmark_RELEASE/dataset``)::

    cls/<id>.mat          MATLAB struct ``GTcls`` whose field ``Segmentation`` is the class-index mask
    train.txt, val.txt    SBD's own splits

:func:`prepare_voc` writes the splits ``train`` and ``val`` (masks in
``SegmentationClass``) and, with SBD, ``train_aug`` = (SBD train ∪ SBD val ∪
VOC train) − VOC val (10,582 images for the official lists), whose masks it
writes to ``SegmentationClassAug/<id>.png``: VOC's own mask where one exists,
otherwise SBD's converted to a palette PNG, so that folder is complete for
``train_aug``.

Image-level labels are the object names of ``Annotations/<id>.xml``; objects
marked ``difficult`` (or ``truncated``/``occluded``) still count as present,
because they are in the picture and the classifier sees them.  Where a mask
exists, its foreground classes are compared with the XML: disagreements are
logged (count) and written to ``<root>/wsss/label_disagreements.json``, and
the XML labels are kept.  An image with a mask but no XML takes its labels
from the mask.
"""

from __future__ import annotations

import functools
import logging
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsss import artifacts
from wsss.classes import builtin_classes
from wsss.datasets.common import image_size, label_classes
from wsss.parallel import imap_images
from wsss.datasets.prepared import SplitSpec, meta_dir, write_prepared
from wsss.errors import WsssError

logger = logging.getLogger(__name__)

IMAGE_DIR = "JPEGImages"
ANNOTATION_DIR = "Annotations"
MASK_DIR = "SegmentationClass"
AUG_MASK_DIR = "SegmentationClassAug"
SEGMENTATION_SETS = Path("ImageSets") / "Segmentation"
DISAGREEMENTS_FILE = "label_disagreements.json"


def read_id_list(path: str | Path) -> list[str]:
    """Return the image ids of a split list (one per line, duplicates dropped, file order kept)."""
    path = Path(path)
    try:
        ids = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as err:
        raise WsssError(f"{path}: cannot read split list ({err.strerror})") from None
    if not ids:
        raise WsssError(f"{path}: split list is empty")
    return list(dict.fromkeys(ids))


def read_annotation(path: str | Path, class_index: dict[str, int]) -> list[int]:
    """Return the sorted foreground class indices named by the objects of a VOC XML annotation.

    Every ``<object>`` counts, ``difficult`` ones included.

    Raises:
        WsssError: naming the file if it is not XML or names a class outside ``class_index``.
    """
    path = Path(path)
    try:
        tree = ElementTree.parse(path)
    except (ElementTree.ParseError, OSError) as err:
        raise WsssError(f"{path}: not a readable VOC annotation ({err})") from None
    labels = set()
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in class_index or class_index[name] == 0:
            raise WsssError(f"{path}: unknown object class {name!r}")
        labels.add(class_index[name])
    return sorted(labels)


def read_sbd_mask(path: str | Path) -> np.ndarray:
    """Read SBD's ``cls/<id>.mat`` (struct ``GTcls``, field ``Segmentation``) as uint8 [H, W]."""
    import scipy.io

    path = Path(path)
    try:
        data = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
        if "GTcls" not in data:
            raise WsssError(f"{path}: no struct GTcls (is this an SBD cls/*.mat file?)")
        mask = np.asarray(data["GTcls"].Segmentation)
    except (scipy.io.matlab.MatReadError, OSError, ValueError, KeyError, AttributeError, TypeError,
            NotImplementedError) as err:
        raise WsssError(f"{path}: not an SBD class mask (struct GTcls with field Segmentation): {err}") from None
    if mask.ndim != 2 or mask.size == 0 or mask.min() < 0 or mask.max() > 255:
        raise WsssError(f"{path}: GTcls.Segmentation must be a 2-D array of class indices, got shape {mask.shape}")
    return mask.astype(np.uint8)


def _check_size(mask: np.ndarray, mask_path: Path, image_path: Path) -> None:
    height, width = image_size(image_path)
    if mask.shape != (height, width):
        raise WsssError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but the image "
                        f"{image_path.name} is {width}x{height}")


@dataclass(frozen=True)
class _ImageTask:
    image_id: str
    image: Path
    annotation: Path
    mask: Path
    listed_in: Path


@dataclass(frozen=True)
class _ImageInfo:
    image_id: str
    xml_labels: list[int] | None
    mask_labels: list[int] | None


def _inspect_image(task: _ImageTask, classes: tuple[str, ...]) -> _ImageInfo:
    """Check one listed image and read its labels from the XML and (if present) the mask."""
    if not task.image.is_file():
        raise WsssError(f"{task.image}: image listed in {task.listed_in} not found")
    class_index = {name: index for index, name in enumerate(classes)}
    xml_labels = read_annotation(task.annotation, class_index) if task.annotation.is_file() else None
    mask_labels = None
    if task.mask.is_file():
        mask = artifacts.read_label_png(task.mask)
        _check_size(mask, task.mask, task.image)
        mask_labels = label_classes(mask, len(classes), task.mask)
    if xml_labels is None and mask_labels is None:
        raise WsssError(f"{task.annotation}: annotation not found and there is no mask {task.mask.name} "
                        f"to take the labels of {task.image_id} (listed in {task.listed_in}) from")
    return _ImageInfo(task.image_id, xml_labels, mask_labels)


@dataclass(frozen=True)
class _AugTask:
    image_id: str
    image: Path
    voc_mask: Path
    sbd_mask: Path
    out: Path


def _valid_label_png(path: Path, image: Path) -> bool:
    """True if ``path`` is a readable label PNG of the image's size (a finished output)."""
    if not path.is_file():
        return False
    try:
        mask = artifacts.read_label_png(path)
        _check_size(mask, path, image)
    except WsssError:
        return False
    return True


def _write_aug_mask(task: _AugTask, num_classes: int, overwrite: bool) -> str:
    """Write ``SegmentationClassAug/<id>.png``; return "skipped", "voc" or "sbd" (its source)."""
    if not task.image.is_file():
        raise WsssError(f"{task.image}: image of train_aug not found")
    if not overwrite and _valid_label_png(task.out, task.image):
        return "skipped"
    if task.voc_mask.is_file():
        source, mask = "voc", artifacts.read_label_png(task.voc_mask)
        source_path = task.voc_mask
    elif task.sbd_mask.is_file():
        source, mask = "sbd", read_sbd_mask(task.sbd_mask)
        source_path = task.sbd_mask
    else:
        raise WsssError(f"{task.sbd_mask}: SBD mask of train_aug image {task.image_id} not found "
                        f"(and there is no {task.voc_mask.name} in {task.voc_mask.parent.name})")
    _check_size(mask, source_path, task.image)
    label_classes(mask, num_classes, source_path)
    artifacts.write_label_png(task.out, mask)
    return source


def _train_aug_ids(sbd_root: Path, voc_train: list[str], voc_val: list[str]) -> list[str]:
    """Return sorted (SBD train ∪ SBD val ∪ VOC train) − VOC val."""
    if not sbd_root.is_dir():
        raise WsssError(f"{sbd_root}: SBD dataset folder not found (expected benchmark_RELEASE/dataset)")
    if not (sbd_root / "cls").is_dir():
        raise WsssError(f"{sbd_root / 'cls'}: SBD class-mask folder not found")
    sbd_ids = set(read_id_list(sbd_root / "train.txt")) | set(read_id_list(sbd_root / "val.txt"))
    return sorted((sbd_ids | set(voc_train)) - set(voc_val))


def _convert_sbd(root: Path, sbd_root: Path, ids: list[str], num_classes: int, workers: int | None,
                 overwrite: bool) -> dict[str, int]:
    tasks = [_AugTask(image_id, root / IMAGE_DIR / f"{image_id}.jpg", root / MASK_DIR / f"{image_id}.png",
                      sbd_root / "cls" / f"{image_id}.mat", artifacts.label_path(root / AUG_MASK_DIR, image_id))
             for image_id in ids]
    write = functools.partial(_write_aug_mask, num_classes=num_classes, overwrite=overwrite)
    counts = {"skipped": 0, "voc": 0, "sbd": 0}
    for source in imap_images(write, tasks, workers, desc=AUG_MASK_DIR):
        counts[source] += 1
    logger.info("%s: %d converted from SBD, %d copied from %s, %d already done", AUG_MASK_DIR, counts["sbd"],
                counts["voc"], MASK_DIR, counts["skipped"])
    return counts


def prepare_voc(root: str | Path, *, sbd_root: str | Path | None = None, split_files: tuple[str | Path, ...] = (),
                workers: int | None = None, overwrite: bool = False) -> dict:
    """Prepare PASCAL VOC 2012 (and SBD's ``train_aug``) under ``<root>/wsss/``.

    Args:
        root: ``VOCdevkit/VOC2012``.
        sbd_root: SBD's ``benchmark_RELEASE/dataset`` folder; adds the split ``train_aug``.
        split_files: extra split lists (e.g. ``ImageSets/Main/trainval.txt``), each prepared as a split
            named after the file stem (replacing a split of that name); masks from ``SegmentationClass``
            when every listed image has one.
        workers: processes for the per-image work (None = all cores).
        overwrite: rewrite ``SegmentationClassAug`` PNGs that already exist and are valid.

    Returns:
        Summary ``{"splits": {name: {"images", "with_masks", "mask_dir", "labels_from_masks",
        "without_labels"}}, "disagreements": n, "sbd": {"skipped", "voc", "sbd"} or None}``.

    Raises:
        WsssError: naming the file for a missing root or list, a listed image that does not exist,
            a mask whose size differs from its image, an unreadable annotation or SBD mask.
    """
    root = Path(root)
    if not root.is_dir():
        raise WsssError(f"{root}: VOC root not found (expected VOCdevkit/VOC2012)")
    if not (root / IMAGE_DIR).is_dir():
        raise WsssError(f"{root / IMAGE_DIR}: image folder not found; is {root} a VOC2012 devkit folder?")
    classes = builtin_classes("voc")

    lists = {name: root / SEGMENTATION_SETS / f"{name}.txt" for name in ("train", "val")}
    for path in lists.values():
        if not path.is_file():
            raise WsssError(f"{path}: split list not found; is {root} a VOC2012 devkit folder?")
    if (root / SEGMENTATION_SETS / "trainval.txt").is_file():
        lists["trainval"] = root / SEGMENTATION_SETS / "trainval.txt"
    for path in map(Path, split_files):
        lists[path.stem] = path
    split_ids = {name: read_id_list(path) for name, path in lists.items()}

    mask_dirs = {name: MASK_DIR for name in split_ids}
    sbd_counts = None
    if sbd_root is not None:
        sbd_root = Path(sbd_root)
        split_ids["train_aug"] = _train_aug_ids(sbd_root, split_ids["train"], split_ids["val"])
        lists["train_aug"] = sbd_root
        mask_dirs["train_aug"] = AUG_MASK_DIR
        sbd_counts = _convert_sbd(root, sbd_root, split_ids["train_aug"], len(classes), workers, overwrite)

    labels: dict[str, list[int]] = {}
    disagreements: dict[str, dict] = {}
    prepared: dict[str, tuple[SplitSpec, list[str]]] = {}
    summary: dict[str, dict] = {}
    inspect = functools.partial(_inspect_image, classes=tuple(classes))
    for name, ids in split_ids.items():
        tasks = [_ImageTask(image_id, root / IMAGE_DIR / f"{image_id}.jpg",
                            root / ANNOTATION_DIR / f"{image_id}.xml",
                            artifacts.label_path(root / mask_dirs[name], image_id), lists[name])
                 for image_id in ids]
        with_masks = from_masks = 0
        for info in imap_images(inspect, tasks, workers, desc=f"voc {name}"):
            with_masks += info.mask_labels is not None
            if info.xml_labels is None:
                from_masks += 1
                labels.setdefault(info.image_id, info.mask_labels)
                continue
            labels.setdefault(info.image_id, info.xml_labels)
            if info.mask_labels is not None and info.mask_labels != info.xml_labels \
                    and info.image_id not in disagreements:
                disagreements[info.image_id] = {
                    "xml": [classes[index] for index in info.xml_labels],
                    "mask": [classes[index] for index in info.mask_labels],
                    "mask_file": f"{mask_dirs[name]}/{info.image_id}.png",
                }
        mask_dir = mask_dirs[name] if with_masks == len(ids) else None
        if mask_dir is None and with_masks:
            logger.warning("split %s: %d of %d images have no mask in %s; the split is prepared without masks",
                           name, len(ids) - with_masks, len(ids), mask_dirs[name])
        prepared[name] = (SplitSpec(image_dir=IMAGE_DIR, image_ext=".jpg", mask_dir=mask_dir), ids)
        summary[name] = {"images": len(ids), "with_masks": with_masks, "mask_dir": mask_dir,
                         "labels_from_masks": from_masks,
                         "without_labels": sum(1 for image_id in ids if not labels[image_id])}

    if disagreements:
        logger.warning("%d images: the classes in the mask disagree with Annotations/*.xml (XML labels kept); "
                       "see %s", len(disagreements), meta_dir(root) / DISAGREEMENTS_FILE)
    write_prepared(root, "voc", classes, prepared, labels, overwrite=overwrite)
    artifacts.write_json(meta_dir(root) / DISAGREEMENTS_FILE,
                         {"count": len(disagreements), "images": dict(sorted(disagreements.items()))})
    return {"root": str(root), "splits": summary, "disagreements": len(disagreements), "sbd": sbd_counts}
