"""``wsss demo-data``: write the synthetic demo dataset in PASCAL VOC layout."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import click

from wsss.stages.options import seed_option
from wsss.datasets import demo
from wsss.errors import WsssError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoDataConfig:
    """Options of ``wsss demo-data``."""

    out_dir: Path
    num_train: int = demo.DEFAULT_NUM_TRAIN
    num_val: int = demo.DEFAULT_NUM_VAL
    size: int = demo.DEFAULT_SIZE
    seed: int = 0


def run(cfg: DemoDataConfig) -> dict:
    """Write ``<out_dir>/VOC2012`` and return ``{"root", "num_train", "num_val"}``."""
    if cfg.num_train < 1 or cfg.num_val < 1:
        raise WsssError(f"--num-train and --num-val must be at least 1, got {cfg.num_train} and {cfg.num_val}")
    if cfg.size < 16:
        raise WsssError(f"--size must be at least 16 pixels, got {cfg.size}")
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise WsssError(f"{out_dir}: exists and is not a folder")
    root = demo.write_demo_dataset(out_dir, num_train=cfg.num_train, num_val=cfg.num_val, size=cfg.size,
                                   seed=cfg.seed)
    log.info("wrote %d train and %d val images to %s", cfg.num_train, cfg.num_val, root)
    return {"root": str(root), "num_train": cfg.num_train, "num_val": cfg.num_val}


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--num-train", type=click.IntRange(min=1), default=demo.DEFAULT_NUM_TRAIN, show_default=True,
              help="Images in the train split.")
@click.option("--num-val", type=click.IntRange(min=1), default=demo.DEFAULT_NUM_VAL, show_default=True,
              help="Images in the val split.")
@click.option("--size", type=click.IntRange(min=16), default=demo.DEFAULT_SIZE, show_default=True,
              help="Long image side in pixels (the short side varies in [0.8, 1] x size).")
@seed_option
def command(out_dir: Path, num_train: int, num_val: int, size: int, seed: int) -> None:
    """Write a synthetic VOC-layout dataset to OUT_DIR/VOC2012 (no download needed).

    Six VOC classes (bird, bottle, bus, car, cat, dog); cat/dog and car/bus
    differ only by a small part.  Prepare it with
    `wsss prepare voc --root OUT_DIR/VOC2012`.
    """
    result = run(DemoDataConfig(out_dir=out_dir, num_train=num_train, num_val=num_val, size=size, seed=seed))
    click.echo(f"demo dataset: {result['root']} ({num_train} train, {num_val} val images)")
