"""``wsss report RUN_DIR``: report.md with per-stage mIoU, per-class IoU, training curves and a gallery."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from wsss.report import write_report


@dataclass(frozen=True)
class ReportConfig:
    run_dir: Path
    gallery_rows: int = 6


def run(cfg: ReportConfig) -> dict:
    """Write ``<run_dir>/report.md`` and ``<run_dir>/report/*.png``; return the per-stage summary."""
    return write_report(cfg.run_dir, gallery_rows=cfg.gallery_rows)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--gallery-rows", type=click.IntRange(min=0), default=6, show_default=True,
              help="Images in the gallery figure.")
def command(run_dir: Path, gallery_rows: int) -> None:
    """Summarise a pipeline run (the folder run_pipeline.sh writes, e.g. work/demo/run)."""
    summary = run(ReportConfig(run_dir=run_dir, gallery_rows=gallery_rows))
    click.echo(f"{'stage':<16} {'split':<10} mIoU")
    for stage in summary["stages"]:
        miou = "–" if stage["miou"] is None else f"{stage['miou']:.4f}"
        click.echo(f"{stage['stage']:<16} {stage['split']:<10} {miou}")
    click.echo(f"wrote {summary['report']}")
