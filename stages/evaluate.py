"""``wsss eval``: mIoU of label maps (pseudo-labels, predictions) or CAMs against ground-truth masks.

Label maps: ``wsss eval --pred DIR --root R --split val``.  CAMs:
``wsss eval --cams DIR --root R --split train --sweep 0.05:0.60:0.01`` scores the
background threshold at every step of the sweep and reports the best one.
The report (summary, per-class scores, sweep, provenance) goes to
``<DIR>/metrics_eval_<split>.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import click

from wsss import artifacts, evaluation
from wsss.datasets.prepared import PreparedDataset
from wsss.settings import Settings, fail, setting
from wsss.stages.options import (allow_pickle_setting, dataset_setting, pool_workers_setting, root_setting,
                                 settings_command, sweep_setting)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig(Settings):
    """Options of ``wsss eval`` (see ``wsss eval --help``); exactly one of ``pred_dir`` and ``cam_dir`` is set."""

    root: Path = root_setting()
    split: str = setting("val", "Split whose ground-truth masks are used.")
    pred_dir: Path | None = setting(None, "Folder of label PNGs <id>.png (pseudo-labels or predictions).",
                                    option="--pred")
    cam_dir: Path | None = setting(None, "Folder of CAM files <id>.npz (or IRN-style <id>.npy with --allow-pickle).",
                                   option="--cams")
    dataset: str | None = dataset_setting()
    ignore_pred_255: bool = setting(False, "Leave out pixels predicted 255 and report coverage (otherwise 255 "
                                           "counts as background).")
    sweep: tuple[float, float, float] = sweep_setting(evaluation.DEFAULT_SWEEP,
                                                      "CAM background thresholds start:stop:step (stop inclusive).")
    allow_pickle: bool = allow_pickle_setting()
    allow_missing: bool = setting(False, "Skip images without a prediction/CAM file instead of failing.")
    out_file: Path | None = setting(None, "JSON report (none: <DIR>/metrics_eval_<split>.json, or "
                                          "<DIR>_metrics_eval_<split>.json beside a ground-truth folder, which is "
                                          "never written into).", option="--out")
    workers: int | None = pool_workers_setting()

    def check(self) -> None:
        if self.pred_dir is not None and self.cam_dir is not None:
            fail("--cams", f"{self.cam_dir}: give exactly one of --pred (label PNGs) and --cams (CAM files), not both")
        if self.pred_dir is None and self.cam_dir is None:
            fail("--pred", "none: give exactly one of --pred (label PNGs) and --cams (CAM files)")
        if self.out_file is not None and self.out_file.is_dir():
            fail("--out", f"{self.out_file}: is a directory; the report is a JSON file")


def default_report_file(dataset: PreparedDataset, folder: Path, split: str) -> Path:
    """Where the report goes without ``--out``: into the scored folder, or beside it when that folder is (or lies
    in) the dataset's ground truth, which is never written into."""
    resolved = Path(folder).resolve()
    if any(resolved == masks or masks in resolved.parents for masks in dataset.mask_folders()):
        return artifacts.eval_metrics_beside(folder, split)
    return artifacts.eval_metrics_path(folder, split)


def run(cfg: EvalConfig) -> dict:
    """Evaluate, write the JSON report and return it (plus ``"report"``: the printable text, not written).

    Returns:
        See :func:`wsss.evaluation.folder_report`; also ``"out_file"``.
    """
    dataset = PreparedDataset.load(cfg.root, cfg.dataset)
    folder = Path(cfg.pred_dir if cfg.pred_dir is not None else cfg.cam_dir)
    result = evaluation.folder_report(dataset, cfg.split, folder, cams=cfg.cam_dir is not None,
                                      thresholds=evaluation.threshold_range(*cfg.sweep),
                                      ignore_pred=cfg.ignore_pred_255, allow_pickle=cfg.allow_pickle,
                                      allow_missing=cfg.allow_missing, workers=cfg.workers)
    report = result.pop("report")
    out_file = cfg.out_file or default_report_file(dataset, folder, cfg.split)
    result["provenance"] = artifacts.provenance(cfg)
    artifacts.write_json(out_file, result)
    log.info("wrote %s", out_file)
    return {**result, "out_file": str(out_file), "report": report}


@settings_command(EvalConfig, name="eval")
def command(cfg: EvalConfig) -> None:
    """mIoU of label maps (--pred) or CAMs (--cams, with a threshold sweep) against ground truth."""
    click.echo(run(cfg)["report"])
