"""``wsss predict``: label maps of a split from a ``train-seg`` checkpoint.

Every image is segmented at full resolution: the softmax probabilities of
each scale (default 0.5, 0.75, 1.0, 1.25, 1.5) and of its mirror image are
averaged, optionally refined by a dense CRF, and the argmax is written as a
VOC palette PNG ``<out>/<id>.png`` (``--overlay`` adds a colour overlay
``<out>/overlay/<id>.jpg``).  Finished images are skipped unless
``--overwrite``; under ``torchrun`` every rank predicts its share of the ids.
``--eval`` scores the predictions against ground truth afterwards (the same
as ``wsss eval --pred <out>``).  ``--checkpoint`` is a ``.pth`` file or a
train-seg output folder (its ``best.pth``, or ``last.pth`` when it was
trained without validation).

CRF defaults are DeepLab-v2's (ResNet-101) post-processing settings:
Gaussian sxy 1 / compat 3, bilateral sxy 67 / srgb 3 / compat 4, 10 iterations.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from torch.utils.data import DataLoader

from stages import options
from wsss import artifacts
from wsss.datasets.prepared import PreparedDataset
from wsss.datasets.torch_data import InferenceDataset, collate_single
from wsss.device import default_workers, dist_info, init_distributed, resolve_device, shard, sum_over_ranks
from wsss.errors import WsssError
from wsss.models.deeplab import model_from_checkpoint
from wsss.progress import bar as progress_bar
from wsss.segmentation import predict_probs
from wsss.visualize import overlay_label

log = logging.getLogger(__name__)

OVERLAY_DIR = "overlay"
DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)


@dataclass(frozen=True)
class PredictConfig:
    """Options of ``wsss predict`` (see ``wsss predict --help``)."""

    root: Path
    checkpoint: Path
    out_dir: Path
    dataset: str | None = None
    split: str = "val"
    scales: tuple[float, ...] = DEFAULT_SCALES
    flip: bool = True
    crf: bool = False
    crf_iterations: int = 10
    crf_gaussian: tuple[float, float] = (1.0, 3.0)  # sxy, compat
    crf_bilateral: tuple[float, float, float] = (67.0, 3.0, 4.0)  # sxy, srgb, compat
    crf_scale: float = 1.0
    overlay: bool = False
    overlay_alpha: float = 0.5
    evaluate: bool = False
    device: str = "auto"
    workers: int | None = None
    overwrite: bool = False


def crf_kwargs(cfg: PredictConfig) -> dict:
    """Keyword arguments of :func:`wsss.crf.dense_crf` from the config."""
    return {"iterations": cfg.crf_iterations, "gaussian_sxy": cfg.crf_gaussian[0], "gaussian_compat": cfg.crf_gaussian[1],
            "bilateral_sxy": cfg.crf_bilateral[0], "bilateral_srgb": cfg.crf_bilateral[1],
            "bilateral_compat": cfg.crf_bilateral[2], "scale": cfg.crf_scale}


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file, or a train-seg output folder: its best.pth, else (no validation) its last.pth."""
    path = Path(path)
    if path.is_dir():
        best = artifacts.checkpoint_path(path, "best")
        return best if best.is_file() else artifacts.checkpoint_path(path, "last")
    return path


def _is_done(cfg: PredictConfig, image_id: str) -> bool:
    try:
        artifacts.read_label_png(artifacts.label_path(cfg.out_dir, image_id))
    except WsssError:
        return False
    return not cfg.overlay or artifacts.overlay_path(Path(cfg.out_dir) / OVERLAY_DIR, image_id).is_file()


def predict_label(model, image: np.ndarray, cfg: PredictConfig, device) -> np.ndarray:
    """Label map uint8 [H, W] of one RGB uint8 [H, W, 3] image (multi-scale, flip, optional CRF)."""
    probs = predict_probs(model, image, scales=cfg.scales, flip=cfg.flip, device=device)
    if cfg.crf:
        from wsss.crf import dense_crf

        probs = dense_crf(image, probs, **crf_kwargs(cfg))
    return probs.argmax(0).astype(np.uint8)


def run(cfg: PredictConfig) -> dict:
    """Predict every image of the split (skipping finished ones) and return the metrics written."""
    if not cfg.scales or min(cfg.scales) <= 0:
        raise WsssError(f"--scales {cfg.scales}: need one or more positive factors")
    if cfg.crf:
        from wsss.crf import CrfParams

        try:
            CrfParams(**crf_kwargs(cfg))
        except ValueError as err:
            raise WsssError(f"--crf-*: {err}") from None
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    dataset = PreparedDataset.load(cfg.root, cfg.dataset)
    checkpoint_file = resolve_checkpoint(cfg.checkpoint)
    checkpoint = artifacts.load_checkpoint(checkpoint_file)
    model = model_from_checkpoint(checkpoint, str(checkpoint_file)).to(device).eval()
    classes = checkpoint.get("classes")
    if list(classes or []) != list(dataset.classes):
        raise WsssError(f"{checkpoint_file}: trained for classes {classes} but {cfg.root} has {dataset.classes}")
    if cfg.evaluate and not dataset.has_masks(cfg.split):
        raise WsssError(f"--eval: split {cfg.split!r} of {cfg.root} has no ground-truth masks")

    ids = dataset.ids(cfg.split)
    mine = shard(ids, info)
    todo = mine if cfg.overwrite else [image_id for image_id in mine if not _is_done(cfg, image_id)]
    if len(todo) < len(mine) and info.is_main:
        log.info("skipping %d finished images (pass --overwrite to redo them)", len(mine) - len(todo))
    if info.is_main:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        artifacts.write_config(cfg.out_dir, cfg, checkpoint_file=str(checkpoint_file),
                               checkpoint_config=checkpoint.get("config"),
                               arch=checkpoint.get("arch"), checkpoint_iteration=checkpoint.get("iteration"),
                               world_size=info.world_size, device=str(device))
    workers = min(default_workers(), 4) if cfg.workers is None else cfg.workers
    loader = DataLoader(InferenceDataset(dataset, cfg.split, ids=todo), batch_size=1, collate_fn=collate_single,
                        num_workers=workers)
    started = time.perf_counter()
    for item in progress_bar(loader, desc=f"predict {cfg.split}", show=info.is_main):
        label = predict_label(model, item["image"], cfg, device)
        artifacts.write_label_png(artifacts.label_path(cfg.out_dir, item["id"]), label)
        if cfg.overlay:
            artifacts.write_image(artifacts.overlay_path(Path(cfg.out_dir) / OVERLAY_DIR, item["id"]),
                                  overlay_label(item["image"], label, cfg.overlay_alpha))
    seconds = time.perf_counter() - started
    # a collective: it also waits for every rank, so all PNGs exist before rank 0 evaluates
    predicted, skipped = (int(value) for value in sum_over_ranks([len(todo), len(mine) - len(todo)], info, device))
    metrics = {"split": cfg.split, "checkpoint": str(checkpoint_file), "num_images": len(ids),
               "predicted": predicted, "skipped": skipped, "seconds": round(seconds, 2),
               "scales": list(cfg.scales), "flip": cfg.flip, "crf": cfg.crf}
    if not info.is_main:
        return metrics
    if cfg.evaluate:
        from wsss.evaluation import evaluate_labels

        matrix = evaluate_labels(dataset, cfg.split, cfg.out_dir, workers=workers)
        metrics["miou"] = matrix.miou()
        metrics["eval"] = matrix.summary(dataset.classes)
        log.info("%s mIoU %.4f\n%s", cfg.split, metrics["miou"], matrix.table(dataset.classes))
    artifacts.write_metrics(cfg.out_dir, metrics)
    return metrics


# --------------------------------------------------------------------------- command line


@click.command(short_help="Segment a split with a train-seg checkpoint.")
@options.root_option()
@options.dataset_option()
@options.split_option("val", "Split to segment.")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True,
              help="best.pth or last.pth of `wsss train-seg`, or its output folder (best.pth, else last.pth).")
@options.out_option("Output folder for <id>.png label maps, config.json and metrics.json.")
@click.option("--scales", default=",".join(str(s) for s in DEFAULT_SCALES), show_default=True, callback=options.positive_scales,
              help="Comma-separated test-time scales.")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Also average the mirrored image.")
@click.option("--crf/--no-crf", default=False, show_default=True, help="Dense-CRF post-processing.")
@click.option("--crf-iterations", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--crf-gaussian", default="1,3", show_default=True, callback=options.fixed_floats(2, "SXY,COMPAT"),
              help="Smoothness kernel SXY,COMPAT.")
@click.option("--crf-bilateral", default="67,3,4", show_default=True, callback=options.fixed_floats(3, "SXY,SRGB,COMPAT"),
              help="Appearance kernel SXY,SRGB,COMPAT.")
@click.option("--crf-scale", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Run the CRF at this fraction of the resolution (faster on large images).")
@click.option("--overlay", is_flag=True, help="Also write colour overlays to <out>/overlay/<id>.jpg.")
@click.option("--overlay-alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True)
@click.option("--eval", "evaluate", is_flag=True, help="Score the predictions against ground truth afterwards.")
@options.device_option
@options.workers_option
@options.overwrite_option
def command(root, dataset, split, checkpoint, out_dir, scales, flip, crf, crf_iterations, crf_gaussian, crf_bilateral,
            crf_scale, overlay, overlay_alpha, evaluate, device, workers, overwrite):
    """Write label maps of a split with a train-seg checkpoint (multi-scale + flip, optional CRF)."""
    cfg = PredictConfig(root=root, checkpoint=checkpoint, out_dir=out_dir, dataset=dataset, split=split, scales=scales,
                        flip=flip, crf=crf, crf_iterations=crf_iterations, crf_gaussian=crf_gaussian,
                        crf_bilateral=crf_bilateral, crf_scale=crf_scale, overlay=overlay, overlay_alpha=overlay_alpha,
                        evaluate=evaluate, device=device, workers=workers, overwrite=overwrite)
    metrics = run(cfg)
    if not dist_info().is_main:
        return
    click.echo(f"{metrics['predicted']} predicted, {metrics['skipped']} skipped -> {cfg.out_dir}")
    if "miou" in metrics:
        click.echo(f"{cfg.split} mIoU {metrics['miou']:.4f}")
