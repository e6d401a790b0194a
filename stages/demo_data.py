"""``wsss demo-data``: write the synthetic demo dataset in PASCAL VOC layout."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import click

from wsss.stages.options import folder_problem, seed_setting, settings_command
from wsss.datasets import demo
from wsss.errors import WsssError
from wsss.settings import Settings, setting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoDataConfig(Settings):
    """Options of ``wsss demo-data``."""

    out_dir: Path = setting(help="Folder to write VOC2012/ into.", argument=True, validate=folder_problem)
    num_train: int = setting(demo.DEFAULT_NUM_TRAIN, "Images in the train split.", at_least=1)
    num_val: int = setting(demo.DEFAULT_NUM_VAL, "Images in the val split.", at_least=1)
    style: str = setting(demo.DEFAULT_STYLE, "What the images show: " + "; ".join(
        f"{style.name}: {style.summary}" for style in demo.STYLES.values()) + ".", choices=demo.STYLE_NAMES)
    size: int | None = setting(None, "Long image side in pixels; the short side varies in [0.8, 1] x size "
                                     "(voc-size: [0.66, 0.8]) (default: the style's, " + ", ".join(
                                         f"{style.name} {style.default_size}" for style in demo.STYLES.values())
                               + ").", at_least=16)
    seed: int = seed_setting()


def run(cfg: DemoDataConfig) -> dict:
    """Write ``<out_dir>/VOC2012`` and return ``{"root", "num_train", "num_val"}``."""
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise WsssError(f"{out_dir}: exists and is not a folder")
    root = demo.write_demo_dataset(out_dir, num_train=cfg.num_train, num_val=cfg.num_val, size=cfg.size,
                                   seed=cfg.seed, style=cfg.style)
    log.info("wrote %d train and %d val images of style %s to %s", cfg.num_train, cfg.num_val, cfg.style, root)
    return {"root": str(root), "num_train": cfg.num_train, "num_val": cfg.num_val, "style": cfg.style}


@settings_command(DemoDataConfig, name="demo-data")
def command(cfg: DemoDataConfig) -> None:
    """Write a synthetic VOC-layout dataset to OUT_DIR/VOC2012 (no download needed).

    VOC class names in every --style: shapes (the default) draws six classes,
    where cat/dog and car/bus differ only by a small part; parts, context and
    voc-size each show one property of real photos (CAMs that cover only a
    part, CAMs that spill onto context, VOC's image size).  Prepare it with
    `wsss prepare voc --root OUT_DIR/VOC2012`.
    """
    result = run(cfg)
    click.echo(f"demo dataset: {result['root']} ({cfg.style}, {cfg.num_train} train, {cfg.num_val} val images)")
