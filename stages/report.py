"""``wsss report RUN_DIR``: report.md with per-stage mIoU, per-class IoU, training curves and a gallery."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from wsss.settings import Settings, fail, setting
from wsss.stages.options import folder_problem, settings_command


@dataclass(frozen=True)
class ReportConfig(Settings):
    """Options of ``wsss report`` (see ``wsss report --help``)."""

    run_dir: Path = setting(help="The run folder run_pipeline.sh writes (e.g. work/demo/run).", argument=True,
                            validate=folder_problem)
    gallery_rows: int = setting(6, "Images in the gallery figure.", at_least=0)

    def check(self) -> None:
        if self.run_dir.is_file():
            fail("RUN_DIR", f"{self.run_dir}: is a file, not a run folder")


def run(cfg: ReportConfig) -> dict:
    """Write ``<run_dir>/report.md`` and ``<run_dir>/report/*.png``; return the per-stage summary."""
    from wsss.report import write_report  # imports OpenCV, which `wsss report --help` does without

    return write_report(cfg.run_dir, gallery_rows=cfg.gallery_rows)


@settings_command(ReportConfig, name="report")
def command(cfg: ReportConfig) -> None:
    """Summarise a pipeline run (the folder run_pipeline.sh writes, e.g. work/demo/run)."""
    summary = run(cfg)
    click.echo(f"{'stage':<16} {'split':<10} mIoU")
    for stage in summary["stages"]:
        miou = "–" if stage["miou"] is None else f"{stage['miou']:.4f}"
        click.echo(f"{stage['stage']:<16} {stage['split']:<10} {miou}")
    click.echo(f"wrote {summary['report']}")
