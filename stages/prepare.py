"""``wsss prepare voc|coco|folder``: split lists and image-level labels, written once per dataset.

Each subcommand reads a dataset in its own layout and writes ``<root>/wsss/``
(``dataset.json``, ``<split>.txt``, ``labels.json``; see
:mod:`wsss.datasets.prepared`) plus a summary ``<root>/wsss/prepare_<kind>.json``.
Every later stage reads the dataset only through that folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import click

from wsss.stages.options import overwrite_option, workers_option
from wsss import artifacts
from wsss.datasets.coco import prepare_coco
from wsss.datasets.folder import prepare_folder
from wsss.datasets.prepared import meta_dir
from wsss.datasets.voc import prepare_voc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VocPrepareConfig:
    """Options of ``wsss prepare voc``."""

    root: Path
    sbd_root: Path | None = None
    split_files: tuple[Path, ...] = ()
    workers: int | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class CocoPrepareConfig:
    """Options of ``wsss prepare coco``."""

    root: Path
    split: str
    workers: int | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class FolderPrepareConfig:
    """Options of ``wsss prepare folder``."""

    images: Path
    labels: Path
    classes: Path
    masks: Path | None = None
    split: str = "train"
    root: Path | None = None
    workers: int | None = None


def summary_path(root: str | Path, kind: str) -> Path:
    """Return ``<root>/wsss/prepare_<kind>.json``."""
    return meta_dir(root) / f"prepare_{kind}.json"


def run(cfg: VocPrepareConfig | CocoPrepareConfig | FolderPrepareConfig) -> dict:
    """Prepare the dataset described by ``cfg``; return the summary also written to ``prepare_<kind>.json``.

    The COCO summary file keeps one entry per split, so preparing ``train2014`` and
    ``val2014`` one after the other leaves both.
    """
    if isinstance(cfg, VocPrepareConfig):
        summary = prepare_voc(cfg.root, sbd_root=cfg.sbd_root, split_files=cfg.split_files, workers=cfg.workers,
                              overwrite=cfg.overwrite)
        artifacts.write_json(summary_path(cfg.root, "voc"), summary)
    elif isinstance(cfg, CocoPrepareConfig):
        summary = prepare_coco(cfg.root, cfg.split, workers=cfg.workers, overwrite=cfg.overwrite)
        path = summary_path(cfg.root, "coco")
        previous = artifacts.read_json(path) if path.is_file() else {}
        splits = previous.get("splits", {}) if isinstance(previous, dict) else {}
        splits[cfg.split] = summary
        artifacts.write_json(path, {"splits": splits})
    elif isinstance(cfg, FolderPrepareConfig):
        summary = prepare_folder(cfg.images, cfg.labels, cfg.classes, masks=cfg.masks, split=cfg.split,
                                 root=cfg.root, workers=cfg.workers)
        artifacts.write_json(summary_path(summary["root"], "folder"), summary)
    else:
        raise TypeError(f"not a prepare config: {type(cfg).__name__}")
    return summary


_dir = click.Path(file_okay=False, path_type=Path)
_file = click.Path(dir_okay=False, path_type=Path)


@click.group()
def command() -> None:
    """Prepare a dataset once: split lists and image-level labels under <root>/wsss/."""


@command.command("voc")
@click.option("--root", type=_dir, required=True, help="PASCAL VOC 2012 folder (VOCdevkit/VOC2012).")
@click.option("--sbd-root", type=_dir, default=None,
              help="SBD dataset folder (benchmark_RELEASE/dataset): adds train_aug and SegmentationClassAug/.")
@click.option("--split-file", "split_files", type=_file, multiple=True,
              help="Extra split list (e.g. ImageSets/Main/trainval.txt), named after its file stem. Repeatable.")
@workers_option
@overwrite_option
def voc_command(root: Path, sbd_root: Path | None, split_files: tuple[Path, ...], workers: int | None,
                overwrite: bool) -> None:
    """PASCAL VOC 2012, optionally with SBD's train_aug (10,582 images).

    Labels come from Annotations/*.xml (difficult objects count); masks that
    disagree are listed in <root>/wsss/label_disagreements.json.
    """
    summary = run(VocPrepareConfig(root=root, sbd_root=sbd_root, split_files=split_files, workers=workers,
                                   overwrite=overwrite))
    for name, split in summary["splits"].items():
        click.echo(f"voc {name}: {split['images']} images, {split['with_masks']} with masks")


@command.command("coco")
@click.option("--root", type=_dir, required=True, help="COCO folder holding annotations/ and the image folders.")
@click.option("--split", required=True, help="train2014 or val2014 (reads annotations/instances_<split>.json).")
@workers_option
@overwrite_option
def coco_command(root: Path, split: str, workers: int | None, overwrite: bool) -> None:
    """MS-COCO 2014: class-index masks and labels from the instances JSON.

    Writes one PNG per image to <root>/SegmentationClass/<split>/; crowd
    regions become 255 (ignore); images without a non-crowd object are left out.
    """
    summary = run(CocoPrepareConfig(root=root, split=split, workers=workers, overwrite=overwrite))
    click.echo(f"coco {split}: {summary['images']} images, {summary['images']} with masks "
               f"({summary['dropped_without_labels']} without labels left out)")


@command.command("folder")
@click.option("--images", type=_dir, required=True, help="Folder of the images.")
@click.option("--labels", type=_file, required=True, help="CSV with header image,labels (labels separated by ';').")
@click.option("--classes", type=_file, required=True,
              help="Class names, one per line (background is prepended if the first line is not 'background').")
@click.option("--masks", type=_dir, default=None, help="Folder of <image stem>.png masks (optional, for eval).")
@click.option("--split", default="train", show_default=True, help="Name of the split written.")
@click.option("--root", type=_dir, default=None, help="Dataset root for wsss/ [default: parent of --images].")
@workers_option
def folder_command(images: Path, labels: Path, classes: Path, masks: Path | None, split: str, root: Path | None,
                   workers: int | None) -> None:
    """Your own images with image-level labels from a CSV."""
    summary = run(FolderPrepareConfig(images=images, labels=labels, classes=classes, masks=masks, split=split,
                                      root=root, workers=workers))
    click.echo(f"folder {split}: {summary['images']} images, {summary['with_masks']} with masks "
               f"({summary['classes']} classes with background)")
