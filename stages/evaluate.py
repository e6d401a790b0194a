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

from wsss.stages.options import (allow_pickle_option, dataset_option, root_option, split_option, threshold_range,
                            workers_option)
from wsss import artifacts, evaluation
from wsss.datasets.prepared import PreparedDataset
from wsss.errors import WsssError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Options of ``wsss eval``; exactly one of ``pred_dir`` and ``cam_dir`` is set."""

    root: Path
    split: str = "val"
    pred_dir: Path | None = None
    cam_dir: Path | None = None
    dataset: str | None = None
    ignore_pred_255: bool = False
    sweep: tuple[float, float, float] = evaluation.DEFAULT_SWEEP
    allow_pickle: bool = False
    allow_missing: bool = False
    out_file: Path | None = None
    workers: int | None = None


def run(cfg: EvalConfig) -> dict:
    """Evaluate, write the JSON report and return it (plus ``"report"``: the printable text, not written).

    Returns:
        See :func:`wsss.evaluation.folder_report`; also ``"out_file"``.
    """
    if (cfg.pred_dir is None) == (cfg.cam_dir is None):
        raise WsssError("give exactly one of --pred (label PNGs) and --cams (CAM files)")
    try:
        thresholds = evaluation.threshold_range(*cfg.sweep)
    except ValueError as err:
        raise WsssError(f"--sweep: {err}") from None
    dataset = PreparedDataset.load(cfg.root, cfg.dataset)
    folder = Path(cfg.pred_dir if cfg.pred_dir is not None else cfg.cam_dir)
    result = evaluation.folder_report(dataset, cfg.split, folder, cams=cfg.cam_dir is not None, thresholds=thresholds,
                                      ignore_pred=cfg.ignore_pred_255, allow_pickle=cfg.allow_pickle,
                                      allow_missing=cfg.allow_missing, workers=cfg.workers)
    report = result.pop("report")
    out_file = cfg.out_file or artifacts.eval_metrics_path(folder, cfg.split)
    result["provenance"] = artifacts.provenance(cfg)
    artifacts.write_json(out_file, result)
    log.info("wrote %s", out_file)
    return {**result, "out_file": str(out_file), "report": report}


@click.command()
@click.option("--pred", "pred_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of label PNGs <id>.png (pseudo-labels or predictions).")
@click.option("--cams", "cam_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of CAM files <id>.npz (or IRN-style <id>.npy with --allow-pickle).")
@dataset_option()
@root_option()
@split_option("val", "Split whose ground-truth masks are used.")
@click.option("--ignore-pred-255", is_flag=True,
              help="Leave out pixels predicted 255 and report coverage (default: 255 counts as background).")
@click.option("--sweep", default="0.05:0.60:0.01", show_default=True, callback=threshold_range,
              help="CAM background thresholds start:stop:step (stop inclusive).")
@allow_pickle_option
@click.option("--allow-missing", is_flag=True, help="Skip images without a prediction/CAM file instead of failing.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON report [default: <DIR>/metrics_eval_<split>.json].")
@workers_option
def command(pred_dir: Path | None, cam_dir: Path | None, dataset: str | None, root: Path, split: str,
            ignore_pred_255: bool, sweep: tuple[float, float, float], allow_pickle: bool, allow_missing: bool,
            out_file: Path | None, workers: int | None) -> None:
    """mIoU of label maps (--pred) or CAMs (--cams, with a threshold sweep) against ground truth."""
    if (pred_dir is None) == (cam_dir is None):
        raise click.UsageError("give exactly one of --pred DIR and --cams DIR")
    result = run(EvalConfig(root=root, split=split, pred_dir=pred_dir, cam_dir=cam_dir, dataset=dataset,
                            ignore_pred_255=ignore_pred_255, sweep=sweep, allow_pickle=allow_pickle,
                            allow_missing=allow_missing, out_file=out_file, workers=workers))
    click.echo(result["report"])
