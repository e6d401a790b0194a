"""A prepared dataset: the split lists, image-level labels and paths that ``wsss prepare`` writes.

Every dataset kind (VOC, COCO, folder, demo) is prepared once into a small
metadata folder ``<root>/wsss/``::

    dataset.json   {"kind", "classes", "splits": {name: {"image_dir", "image_ext",
                    "mask_dir", "mask_ext", "image_files"?}}}
    <split>.txt    one image id per line
    labels.json    {image id: [class index, ...]}   (foreground classes, background = 0 never listed)

Paths inside ``dataset.json`` are relative to ``<root>`` (absolute paths are
kept as they are).  Stages read datasets only through :class:`PreparedDataset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsss import artifacts
from wsss.errors import WsssError

META_DIR = "wsss"
MANIFEST = "dataset.json"
LABELS = "labels.json"
DATASET_KINDS = ("voc", "coco", "folder")


def meta_dir(root: str | Path) -> Path:
    """Return the metadata folder of a dataset root."""
    return Path(root) / META_DIR


def summary_path(root: str | Path, kind: str) -> Path:
    """Return ``<root>/wsss/prepare_<kind>.json``, the summary ``wsss prepare <kind>`` writes."""
    return meta_dir(root) / f"prepare_{kind}.json"


@dataclass
class SplitSpec:
    """Where one split's images and masks live (paths relative to the dataset root)."""

    image_dir: str
    image_ext: str = ".jpg"
    mask_dir: str | None = None
    mask_ext: str = ".png"
    image_files: dict[str, str] | None = None  # id -> file relative to image_dir, for mixed extensions


@dataclass
class PreparedDataset:
    """A dataset prepared by ``wsss prepare``; the only way stages find images, masks and labels."""

    root: Path
    kind: str
    classes: list[str]
    splits: dict[str, SplitSpec]
    labels: dict[str, list[int]] = field(repr=False)
    _ids: dict[str, list[str]] = field(default_factory=dict, repr=False)

    # ----------------------------------------------------------------- reading

    @classmethod
    def load(cls, root: str | Path, kind: str | None = None) -> "PreparedDataset":
        """Open the prepared dataset at ``root``; ``kind`` (if given) must match what was prepared."""
        root = Path(root)
        if not root.is_dir():
            raise WsssError(f"{root}: dataset root not found")
        manifest_file = meta_dir(root) / MANIFEST
        if not manifest_file.is_file():
            hint = f"wsss prepare {kind or 'voc|coco|folder'} --root {root}"
            raise WsssError(f"{manifest_file}: dataset not prepared; run `{hint}` first")
        manifest = artifacts.read_json(manifest_file, expect=dict)
        try:
            splits = {name: SplitSpec(**spec) for name, spec in manifest["splits"].items()}
            prepared_kind, classes = manifest["kind"], list(manifest["classes"])
        except (KeyError, TypeError, AttributeError) as err:
            raise WsssError(f"{manifest_file}: malformed dataset manifest ({type(err).__name__}: {err}); "
                            "run `wsss prepare` again") from None
        if len(classes) < 2 or not all(isinstance(name, str) for name in classes):
            raise WsssError(f"{manifest_file}: 'classes' must list background and at least one class name")
        if kind is not None and kind != prepared_kind:
            raise WsssError(f"{manifest_file}: dataset was prepared as {prepared_kind!r}, not {kind!r}")
        labels_file = meta_dir(root) / LABELS
        return cls(root=root, kind=prepared_kind, classes=classes, splits=splits,
                   labels=_checked_labels(artifacts.read_json(labels_file, expect=dict), len(classes), labels_file))

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.classes)

    def _spec(self, split: str) -> SplitSpec:
        if split not in self.splits:
            raise WsssError(f"{meta_dir(self.root) / MANIFEST}: no split {split!r}; prepared splits: {sorted(self.splits)}")
        return self.splits[split]

    def ids(self, split: str) -> list[str]:
        """Return the image ids of a split, in file order."""
        self._spec(split)
        if split not in self._ids:
            path = meta_dir(self.root) / f"{split}.txt"
            try:
                lines = path.read_text(encoding="utf-8").split()
            except OSError:
                raise WsssError(f"{path}: split list not found") from None
            self._ids[split] = lines
        return self._ids[split]

    def image_labels(self, image_id: str) -> list[int]:
        """Return the foreground class indices present in an image (sorted, background excluded)."""
        try:
            return self.labels[image_id]
        except KeyError:
            raise WsssError(f"{meta_dir(self.root) / LABELS}: no image-level labels for {image_id!r}") from None

    def multi_hot(self, image_id: str) -> np.ndarray:
        """Return float32 [num_classes - 1]: 1 for each foreground class present."""
        target = np.zeros(self.num_classes - 1, dtype=np.float32)
        for index in self.image_labels(image_id):
            target[index - 1] = 1.0
        return target

    def mask_folders(self) -> set[Path]:
        """The resolved ground-truth mask folders of every split."""
        return {self._resolve(spec.mask_dir).resolve() for spec in self.splits.values() if spec.mask_dir is not None}

    def _resolve(self, relative: str) -> Path:
        path = Path(relative)
        return path if path.is_absolute() else self.root / path

    def image_path(self, split: str, image_id: str) -> Path:
        spec = self._spec(split)
        if spec.image_files is not None and image_id in spec.image_files:
            return self._resolve(spec.image_dir) / spec.image_files[image_id]
        return self._resolve(spec.image_dir) / f"{image_id}{spec.image_ext}"

    def has_masks(self, split: str) -> bool:
        return self._spec(split).mask_dir is not None

    def mask_path(self, split: str, image_id: str) -> Path:
        spec = self._spec(split)
        if spec.mask_dir is None:
            raise WsssError(f"split {split!r} of {self.root} has no ground-truth masks")
        return self._resolve(spec.mask_dir) / f"{image_id}{spec.mask_ext}"

    def read_image(self, split: str, image_id: str) -> np.ndarray:
        """Return the RGB uint8 [H, W, 3] image."""
        return artifacts.read_image(self.image_path(split, image_id))

    def read_mask(self, split: str, image_id: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Return the ground-truth uint8 [H, W] mask; ``shape`` (H, W) is checked if given."""
        path = self.mask_path(split, image_id)
        mask = artifacts.read_label_png(path)
        if shape is not None and mask.shape != tuple(shape):
            raise WsssError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is {shape[1]}x{shape[0]}")
        bad = (mask >= self.num_classes) & (mask != artifacts.IGNORE_INDEX)
        if bad.any():
            raise WsssError(f"{path}: mask holds class index {int(mask[bad].max())} outside 0..{self.num_classes - 1} and 255")
        return mask


def _checked_labels(labels: dict, num_classes: int, path: Path) -> dict[str, list[int]]:
    """``labels.json`` as ``{id: [class index, ...]}``, every index a foreground class ``1 .. num_classes - 1``."""
    checked = {}
    for image_id, value in labels.items():
        if not isinstance(value, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
            raise WsssError(f"{path}: labels of {image_id!r} must be a list of class indices, got {value!r}")
        if any(not 1 <= c < num_classes for c in value):
            raise WsssError(f"{path}: labels of {image_id!r} are {value}; class indices must lie in "
                            f"1..{num_classes - 1} (background 0 is never listed)")
        checked[image_id] = value
    return checked


def _refuse_relabelling(labels_file: Path, old_labels: dict, labels: dict, classes: list[str], old_splits: dict,
                        folder: Path) -> None:
    """Raise WsssError naming the first image id whose labels differ from an earlier prepare's."""
    for image_id, value in labels.items():
        before = old_labels.get(image_id)
        if before is not None and sorted(before) != sorted(int(c) for c in value):
            splits = [name for name in old_splits if image_id in _listed(folder / f"{name}.txt")]
            names = [[classes[c] if 0 <= c < len(classes) else c for c in sorted(group)] for group in (before, value)]
            where = f" (split {', '.join(splits)})" if splits else ""
            raise WsssError(f"{labels_file}: image {image_id!r} is labelled {names[0]} by an earlier prepare{where} "
                            f"and {names[1]} here; pass --overwrite to relabel it")


def _listed(split_file: Path) -> set[str]:
    return set(split_file.read_text().split()) if split_file.is_file() else set()


def write_prepared(root: str | Path, kind: str, classes: list[str], splits: dict[str, tuple[SplitSpec, list[str]]],
                   labels: dict[str, list[int]], *, overwrite: bool = False) -> Path:
    """Write (or extend) the metadata of a prepared dataset and return its folder.

    ``splits`` maps a split name to its spec and image ids.  Splits and labels already prepared under
    the same root are kept.  What an earlier prepare wrote is never changed silently: another kind or
    class list, or another label for an image id already labelled, is an error unless ``overwrite``
    (then the earlier splits go with another class list, and the new labels replace the old).

    Raises:
        WsssError: the earlier prepare disagrees and ``overwrite`` is off (naming the file, the id and
            both values).
    """
    if kind not in DATASET_KINDS:
        raise KeyError(f"unknown dataset kind {kind!r}; choose from {list(DATASET_KINDS)}")
    folder = meta_dir(root)
    manifest_file, labels_file = folder / MANIFEST, folder / LABELS
    old_splits, old_labels = {}, {}
    if manifest_file.is_file():
        old = artifacts.read_json(manifest_file)
        if old.get("kind") == kind and old.get("classes") == list(classes):
            old_splits = old.get("splits", {})
            if labels_file.is_file():
                old_labels = artifacts.read_json(labels_file)
        elif not overwrite:
            raise WsssError(f"{manifest_file}: an earlier prepare wrote {old.get('kind')} with classes "
                            f"{old.get('classes')}; this one has {kind} with {list(classes)}. Pass --overwrite to "
                            "replace it (its splits and labels go), or prepare into another --root")
    if not overwrite:
        _refuse_relabelling(labels_file, old_labels, labels, list(classes), old_splits, folder)
    for name, (spec, ids) in splits.items():
        with artifacts.atomic_write(folder / f"{name}.txt", "w") as handle:
            handle.write("".join(f"{image_id}\n" for image_id in ids))
        old_splits[name] = {key: value for key, value in vars(spec).items() if value is not None or key == "mask_dir"}
    old_labels.update({key: sorted(int(c) for c in value) for key, value in labels.items()})
    artifacts.write_json(labels_file, dict(sorted(old_labels.items())))
    artifacts.write_json(manifest_file, {"kind": kind, "classes": list(classes), "splits": old_splits})
    return folder
