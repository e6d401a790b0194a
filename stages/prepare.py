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

from wsss.stages.options import file_problem, folder_problem, overwrite_setting, pool_workers_setting, settings_command
from wsss import artifacts
from wsss.datasets.coco import prepare_coco
from wsss.datasets.folder import prepare_folder
from wsss.datasets.prepared import summary_path
from wsss.datasets.voc import prepare_voc
from wsss.settings import Settings, setting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VocPrepareConfig(Settings):
    """Options of ``wsss prepare voc``."""

    root: Path = setting(help="PASCAL VOC 2012 folder (VOCdevkit/VOC2012).", validate=folder_problem)
    sbd_root: Path | None = setting(None, "SBD dataset folder (benchmark_RELEASE/dataset): adds train_aug and "
                                          "SegmentationClassAug/.")
    split_files: tuple[Path, ...] = setting((), "Extra split list (e.g. ImageSets/Main/trainval.txt), named after its "
                                                "file stem. Repeatable.", option="--split-file", metavar="PATH",
                                                repeat=True)
    workers: int | None = pool_workers_setting()
    overwrite: bool = overwrite_setting()


@dataclass(frozen=True)
class CocoPrepareConfig(Settings):
    """Options of ``wsss prepare coco``."""

    root: Path = setting(help="COCO folder holding annotations/ and the image folders.", validate=folder_problem)
    split: str = setting(help="train2014 or val2014 (reads annotations/instances_<split>.json).")
    workers: int | None = pool_workers_setting()
    overwrite: bool = overwrite_setting()


@dataclass(frozen=True)
class FolderPrepareConfig(Settings):
    """Options of ``wsss prepare folder``."""

    images: Path = setting(help="Folder of the images.", validate=folder_problem)
    labels: Path = setting(help="CSV with header image,labels (labels separated by ';').", validate=file_problem)
    classes: Path = setting(help="Class names, one per line (background is prepended if the first line is not "
                                 "'background').", validate=file_problem)
    masks: Path | None = setting(None, "Folder of <image stem>.png masks (optional, for eval).",
                                 validate=folder_problem)
    split: str = setting("train", "Name of the split written.")
    root: Path | None = setting(None, "Dataset root for wsss/ (none: the parent of --images).", validate=folder_problem)
    workers: int | None = pool_workers_setting()
    overwrite: bool = setting(False, "Replace what an earlier prepare under --root wrote where this one disagrees "
                                     "(another class list, another label for an image); without it that is an "
                                     "error.", flag="--overwrite/--keep")


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
                                 root=cfg.root, workers=cfg.workers, overwrite=cfg.overwrite)
        artifacts.write_json(summary_path(summary["root"], "folder"), summary)
    else:
        raise TypeError(f"not a prepare config: {type(cfg).__name__}")
    return summary


# --------------------------------------------------------------------------- command line


@click.group()
def command() -> None:
    """Prepare a dataset once: split lists and image-level labels under <root>/wsss/."""


@settings_command(VocPrepareConfig, name="voc", short_help="PASCAL VOC 2012, optionally with SBD's train_aug.")
def voc_command(cfg: VocPrepareConfig) -> None:
    """PASCAL VOC 2012, optionally with SBD's train_aug (10,582 images).

    Labels come from Annotations/*.xml (difficult objects count); masks that
    disagree are listed in <root>/wsss/label_disagreements.json.
    """
    summary = run(cfg)
    for name, split in summary["splits"].items():
        click.echo(f"voc {name}: {split['images']} images, {split['with_masks']} with masks")


@settings_command(CocoPrepareConfig, name="coco", short_help="MS-COCO 2014: masks and labels from the instances JSON.")
def coco_command(cfg: CocoPrepareConfig) -> None:
    """MS-COCO 2014: class-index masks and labels from the instances JSON.

    Writes one PNG per image to <root>/SegmentationClass/<split>/; crowd
    regions become 255 (ignore); images without a non-crowd object are left out.
    """
    summary = run(cfg)
    click.echo(f"coco {cfg.split}: {summary['images']} images, {summary['images']} with masks "
               f"({summary['dropped_without_labels']} without labels left out)")


@settings_command(FolderPrepareConfig, name="folder", short_help="Your own images with image-level labels from a CSV.")
def folder_command(cfg: FolderPrepareConfig) -> None:
    """Your own images with image-level labels from a CSV."""
    summary = run(cfg)
    click.echo(f"folder {cfg.split}: {summary['images']} images, {summary['with_masks']} with masks "
               f"({summary['classes']} classes with background)")


for subcommand in (voc_command, coco_command, folder_command):
    command.add_command(subcommand)
