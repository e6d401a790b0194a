"""``wsss export``: a deployable copy of a ``train-seg`` network (TorchScript, ONNX or torch.export).

Writes ``<out>/model.pt`` (TorchScript), ``<out>/model.onnx`` or ``<out>/model.pt2`` (a
``torch.export`` program), ``<out>/classes.txt`` (one class name per line, in output order),
``config.json`` and ``metrics.json`` (the check of :func:`wsss.export.export_model`: the largest
difference between the exported and the eager model's logits on two check images).  The model
takes float32 RGB values 0–255 [N, 3, H, W] and returns logits [N, C, H, W]; see
:mod:`wsss.export`.  An export already in ``--out`` from the same checkpoint and settings is kept
unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import click

from wsss import artifacts
from wsss.errors import WsssError
from wsss.models import EXPORT_FORMATS
from wsss.settings import Settings, setting
from wsss.stages.options import folder_problem, overwrite_setting, settings_command

CLASSES_FILE = "classes.txt"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig(Settings):
    """Options of ``wsss export`` (see ``wsss export --help``)."""

    checkpoint: Path = setting(help="best.pth or last.pth of `wsss train-seg`, or its output folder (best.pth, else "
                                    "last.pth).")
    out_dir: Path = setting(help="Output folder for the model file, classes.txt, config.json and metrics.json.",
                            option="--out", validate=folder_problem)
    export_format: str = setting("torchscript", "torchscript: model.pt for torch.jit.load (also from C++); onnx: "
                                                "model.onnx (needs the onnx extra); pt2: model.pt2 for "
                                                "torch.export.load.", option="--format",
                                 choices=tuple(EXPORT_FORMATS))
    opset: int = setting(18, "ONNX opset version (--format onnx); PyTorch's exporter writes 18 and later.",
                         at_least=18)
    overwrite: bool = overwrite_setting()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _already_exported(cfg: ExportConfig, model_file: Path, checkpoint_file: Path, step) -> bool:
    """True when ``--out`` holds a whole export of this checkpoint with these settings; a damaged or
    unfinished one is redone.

    Raises:
        WsssError: ``--out`` holds an export of another checkpoint (without ``--overwrite``).
    """
    previous = None if cfg.overwrite else artifacts.previous_config(cfg.out_dir)
    if previous is None:
        return False
    made_from = (previous.get("checkpoint_file"), previous.get("checkpoint_step"))
    if made_from != (str(checkpoint_file), step):
        raise WsssError(f"{artifacts.config_path(cfg.out_dir)}: {cfg.out_dir} holds an export of {made_from[0]} "
                        f"(step {made_from[1]}); pass --overwrite or choose another --out")
    try:
        metrics = artifacts.read_json(artifacts.metrics_path(cfg.out_dir), dict)
    except WsssError:
        return False
    same = {key: previous.get("config", {}).get(key) for key in ("export_format", "opset")}
    return (same == {"export_format": cfg.export_format, "opset": cfg.opset} and model_file.is_file()
            and metrics.get("sha256") == _sha256(model_file))


def run(cfg: ExportConfig) -> dict:
    """Export the checkpoint's network to ``--out`` (unless done already) and return the metrics written.

    ``config.json`` and ``metrics.json`` (with the model file's SHA-256) are written last, after the
    checked model file: a folder with them holds a whole export.
    """
    from wsss.export import export_model
    from wsss.models.deeplab import checkpoint_classes, model_from_checkpoint

    checkpoint_file = artifacts.resolve_checkpoint(cfg.checkpoint)
    checkpoint = artifacts.load_checkpoint(checkpoint_file)
    net = model_from_checkpoint(checkpoint, str(checkpoint_file))
    classes = checkpoint_classes(checkpoint, str(checkpoint_file))
    model_file = Path(cfg.out_dir) / EXPORT_FORMATS[cfg.export_format]
    if _already_exported(cfg, model_file, checkpoint_file, checkpoint.get("step")):
        return artifacts.read_json(artifacts.metrics_path(cfg.out_dir), dict) | {"skipped": True}
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    artifacts.metrics_path(cfg.out_dir).unlink(missing_ok=True)  # an earlier export's, until this one is whole
    log.info("exporting %s as %s", checkpoint_file, cfg.export_format)
    started = time.perf_counter()
    check = export_model(net, classes, cfg.export_format, model_file, opset=cfg.opset)
    with artifacts.atomic_write(Path(cfg.out_dir) / CLASSES_FILE, "w") as handle:
        handle.write("".join(f"{name}\n" for name in classes))
    artifacts.write_config(cfg.out_dir, cfg, checkpoint_file=str(checkpoint_file), arch=checkpoint.get("arch"),
                           checkpoint_step=checkpoint.get("step"), classes=classes)
    metrics = {"format": cfg.export_format, "file": str(model_file), "checkpoint": str(checkpoint_file),
               "classes": classes, "input": "float32 [N, 3, H, W] RGB 0-255",
               "output": f"float32 [N, {len(classes)}, H, W] logits", **check,
               "seconds": round(time.perf_counter() - started, 2)}
    artifacts.write_metrics(cfg.out_dir, metrics)
    return metrics


@settings_command(ExportConfig, name="export")
def command(cfg: ExportConfig) -> None:
    """Export a train-seg checkpoint for deployment: TorchScript, ONNX or torch.export (RGB 0-255 in, logits out)."""
    metrics = run(cfg)
    worst = max(metrics["max_abs_diff"].values())
    done = "already exported" if metrics.get("skipped") else "exported"
    click.echo(f"{done} -> {metrics['file']} ({metrics['bytes'] / 2**20:.1f} MiB; largest difference to the "
               f"checkpoint's logits {worst:.2g})")
