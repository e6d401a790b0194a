"""``wsss predict``: label maps of a split from a ``train-seg`` checkpoint.

Every image is segmented at full resolution: the softmax probabilities of
each scale (default 0.5, 0.75, 1.0, 1.25, 1.5) and of its mirror image are
averaged, optionally refined by a dense CRF, and the argmax is written as a
VOC palette PNG ``<out>/<id>.png`` (``--overlay`` adds a colour overlay
``<out>/overlay/<id>.jpg``).  Finished images are skipped unless
``--overwrite``; under ``torchrun`` every rank (and with ``--shard I/N`` every shard) predicts its share of the ids.
Up to ``--batch-size`` images of one size share each forward pass; probabilities
are averaged and the argmax taken on the device, and only the uint8 label map
(the probabilities with ``--crf``) comes back to the host.  The CRF runs in
``--workers`` processes while the network segments the next batch.
``--eval`` scores the predictions against ground truth afterwards (the same
as ``wsss eval --pred <out>``).  ``--checkpoint`` is a ``.pth`` file or a
train-seg output folder (its ``best.pth``, or ``last.pth`` when it was
trained without validation).

CRF defaults are DeepLab-v2's (ResNet-101) post-processing settings:
Gaussian sxy 1 / compat 3, bilateral sxy 67 / srgb 3 / compat 4, 10 iterations.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from wsss.stages import options
from wsss import artifacts
from wsss.crf import POSTPROCESS_CRF, CrfParams
from wsss.datasets.prepared import PreparedDataset
from wsss.device import DistInfo, default_workers, dist_info, shard, sum_over_ranks
from wsss.errors import WsssError, option_name
from wsss.inference import BackgroundWriter, split_batches, to_model_input
from wsss.models.backbones import prepare_for_inference
from wsss.models.deeplab import model_from_checkpoint
from wsss.progress import bar as progress_bar
from wsss.segmentation import predict_probs, segment_batch
from wsss.training import Precision, maybe_compile, start_runtime
from wsss.visualize import overlay_label

log = logging.getLogger(__name__)

OVERLAY_DIR = "overlay"
DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)


@dataclass(frozen=True)
class PredictConfig:
    """Options of ``wsss predict`` (see ``wsss predict --help``); ``crf`` None = no CRF post-processing."""

    root: Path
    checkpoint: Path
    out_dir: Path
    dataset: str | None = None
    split: str = "val"
    scales: tuple[float, ...] = DEFAULT_SCALES
    flip: bool = True
    crf: CrfParams | None = None
    overlay: bool = False
    overlay_alpha: float = 0.5
    evaluate: bool = False
    batch_size: int = 4
    amp: str = "auto"
    compile_model: bool = False
    device: str = "auto"
    workers: int | None = None
    threads: int | None = None
    shard: tuple[int, int] = (0, 1)
    overwrite: bool = False


# what decides a label map besides the checkpoint: a folder predicted with other values is not resumed into
OUTPUT_SETTINGS = ("scales", "flip", "crf")


def _check_previous_run(cfg: PredictConfig, checkpoint_file: Path, step) -> None:
    """Refuse to resume into a folder predicted with another checkpoint or other settings (files would mix)."""
    previous = None if cfg.overwrite else artifacts.previous_config(cfg.out_dir, cfg.shard)
    if previous is None:
        return
    try:
        before = {key: previous["config"][key] for key in OUTPUT_SETTINGS}
        made_by = (previous["checkpoint_file"], previous["checkpoint_step"])
    except (KeyError, TypeError):
        return  # a config.json without the settings: nothing to compare
    now = artifacts.provenance(cfg)["config"]
    changed = [option_name(key) for key in OUTPUT_SETTINGS if before[key] != now[key]]
    if made_by != (str(checkpoint_file), step):
        changed.insert(0, "--checkpoint")
    if changed:
        path = artifacts.config_path(cfg.out_dir, cfg.shard)
        raise WsssError(f"{path}: {cfg.out_dir} was predicted with other settings ({', '.join(changed)}); "
                        "pass --overwrite or choose another --out")


def _is_done(cfg: PredictConfig, image_id: str, num_classes: int | None = None) -> bool:
    """True when the label map (and overlay) exist and are valid (anything unreadable is redone)."""
    try:
        artifacts.read_label_png(artifacts.label_path(cfg.out_dir, image_id), num_classes)
    except WsssError:
        return False
    return not cfg.overlay or artifacts.overlay_path(Path(cfg.out_dir) / OVERLAY_DIR, image_id).is_file()


def predict_label(model, image: np.ndarray, cfg: PredictConfig, device) -> np.ndarray:
    """Label map uint8 [H, W] of one RGB uint8 [H, W, 3] image (multi-scale, flip, optional CRF)."""
    probs = predict_probs(model, image, scales=cfg.scales, flip=cfg.flip, device=device)
    if cfg.crf is not None:
        from wsss.crf import dense_crf

        probs = dense_crf(image, probs, **cfg.crf.kwargs())
    return probs.argmax(0).astype(np.uint8)


def _write(cfg: PredictConfig, image_id: str, label: np.ndarray, image: np.ndarray | None) -> None:
    if cfg.crf is not None:
        from wsss.crf import dense_crf

        label = dense_crf(image, label, **cfg.crf.kwargs()).argmax(0).astype(np.uint8)  # label holds probabilities
    artifacts.write_label_png(artifacts.label_path(cfg.out_dir, image_id), label)
    if cfg.overlay:
        artifacts.write_image(artifacts.overlay_path(Path(cfg.out_dir) / OVERLAY_DIR, image_id),
                              overlay_label(image, label, cfg.overlay_alpha))


def write_predictions(model, dataset: PreparedDataset, cfg: PredictConfig, ids: list[str], device: torch.device,
                      precision: Precision, info: DistInfo) -> None:
    """Segment ``ids`` in size-bucketed batches and write their label maps (and overlays)."""
    workers = min(default_workers(), 4) if cfg.workers is None else cfg.workers
    keep_images = cfg.overlay or cfg.crf is not None
    # the CRF (seconds per VOC image) runs in --workers processes, beside the network; plain writes on a thread
    crf_processes = workers if cfg.crf is not None and len(ids) > 1 else 0
    with BackgroundWriter(processes=crf_processes) as writer, \
            progress_bar(total=len(ids), desc=f"predict {cfg.split}", show=info.is_main) as bar:
        for batch_ids, images, _ in split_batches(dataset, cfg.split, ids, batch_size=cfg.batch_size,
                                                  workers=workers, device=device):
            probs = segment_batch(model, to_model_input(images), cfg.scales, cfg.flip, precision)
            # the CRF needs the probabilities; otherwise only the uint8 argmax leaves the device
            results = probs.cpu().numpy() if cfg.crf is not None else probs.argmax(1).to(torch.uint8).cpu().numpy()
            pictures = images.cpu().numpy() if keep_images else [None] * len(batch_ids)
            for image_id, result, picture in zip(batch_ids, results, pictures):
                writer.submit(_write, cfg, image_id, result, picture)
            bar.update(len(batch_ids))


def run(cfg: PredictConfig) -> dict:
    """Predict every image of the split (skipping finished ones) and return the metrics written."""
    if not cfg.scales or not all(math.isfinite(scale) and scale > 0 for scale in cfg.scales):
        raise WsssError(f"--scales {cfg.scales}: need one or more positive factors")
    if cfg.evaluate and cfg.shard[1] > 1:
        raise WsssError("--eval scores the whole split: run `wsss eval --pred` once every --shard has finished")
    runtime = start_runtime(cfg.device, cfg.threads, cfg.amp)
    device, info, precision = runtime.device, runtime.info, runtime.precision
    dataset = PreparedDataset.load(cfg.root, cfg.dataset)
    checkpoint_file = artifacts.resolve_checkpoint(cfg.checkpoint)
    checkpoint = artifacts.load_checkpoint(checkpoint_file)
    model = prepare_for_inference(model_from_checkpoint(checkpoint, str(checkpoint_file)).to(device))
    if list(checkpoint.get("classes") or []) != list(dataset.classes):
        raise WsssError(f"{checkpoint_file}: trained for classes {checkpoint.get('classes')} but {cfg.root} has "
                        f"{dataset.classes}")
    if cfg.evaluate and not dataset.has_masks(cfg.split):
        raise WsssError(f"--eval: split {cfg.split!r} of {cfg.root} has no ground-truth masks")
    ids = dataset.ids(cfg.split)
    if not ids:
        raise WsssError(f"{cfg.root}: split {cfg.split!r} has no images")
    _check_previous_run(cfg, checkpoint_file, checkpoint.get("step"))
    mine = shard(ids, info, cfg.shard)
    todo = mine if cfg.overwrite else [image_id for image_id in mine
                                       if not _is_done(cfg, image_id, dataset.num_classes)]
    if len(todo) < len(mine) and info.is_main:
        log.info("skipping %d finished images (pass --overwrite to redo them)", len(mine) - len(todo))
    if info.is_main:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        artifacts.write_config(cfg.out_dir, cfg, shard=cfg.shard, checkpoint_file=str(checkpoint_file),
                               checkpoint_config=checkpoint.get("config"), arch=checkpoint.get("arch"),
                               checkpoint_step=checkpoint.get("step"), world_size=info.world_size,
                               device=str(device), precision=precision.name)
    started = time.perf_counter()
    write_predictions(maybe_compile(model, cfg.compile_model), dataset, cfg, todo, device, precision, info)
    seconds = time.perf_counter() - started
    # a collective: it also waits for every rank, so all PNGs exist before rank 0 evaluates
    predicted, skipped = (int(value) for value in sum_over_ranks([len(todo), len(mine) - len(todo)], info, device))
    metrics = {"split": cfg.split, "checkpoint": str(checkpoint_file), "num_images": len(ids),
               "predicted": predicted, "skipped": skipped, "seconds": round(seconds, 2),
               "images_per_second": round(len(todo) / seconds, 4) if todo and seconds > 0 else None,
               "scales": list(cfg.scales), "flip": cfg.flip, "crf": cfg.crf is not None, "precision": precision.name}
    if info.is_main and cfg.evaluate:
        from wsss.evaluation import evaluate_labels

        matrix = evaluate_labels(dataset, cfg.split, cfg.out_dir, workers=cfg.workers)
        metrics["miou"], metrics["eval"] = matrix.miou(), matrix.summary(dataset.classes)
        log.info("%s mIoU %.4f\n%s", cfg.split, metrics["miou"], matrix.table(dataset.classes))
    if info.is_main:
        artifacts.write_metrics(cfg.out_dir, metrics, shard=cfg.shard)
    return metrics


# --------------------------------------------------------------------------- command line


@click.command(short_help="Segment a split with a train-seg checkpoint.")
@options.root_option()
@options.dataset_option()
@options.split_option("val", "Split to segment.")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True,
              help="best.pth or last.pth of `wsss train-seg`, or its output folder (best.pth, else last.pth).")
@options.out_option("Output folder for <id>.png label maps, config.json and metrics.json.")
@click.option("--scales", default=",".join(str(s) for s in DEFAULT_SCALES), show_default=True,
              callback=options.old_positive_scales, help="Comma-separated test-time scales.")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Also average the mirrored image.")
@click.option("--crf/--no-crf", default=False, show_default=True, help="Dense-CRF post-processing.")
@click.option("--crf-iterations", type=click.IntRange(min=1), default=POSTPROCESS_CRF.iterations, show_default=True)
@click.option("--crf-gaussian", default="1,3", show_default=True,
              callback=options.fixed_floats(2, "SXY,COMPAT", positive=(0,)),
              help="Smoothness kernel SXY,COMPAT.")
@click.option("--crf-bilateral", default="67,3,4", show_default=True,
              callback=options.fixed_floats(3, "SXY,SRGB,COMPAT", positive=(0, 1)),
              help="Appearance kernel SXY,SRGB,COMPAT.")
@click.option("--crf-scale", type=options.FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True,
              help="Run the CRF at this fraction of the resolution (faster on large images).")
@click.option("--overlay", is_flag=True, help="Also write colour overlays to <out>/overlay/<id>.jpg.")
@click.option("--overlay-alpha", type=options.FiniteFloat(0, 1), default=0.5, show_default=True)
@click.option("--eval", "evaluate", is_flag=True, help="Score the predictions against ground truth afterwards.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images of equal size per forward pass.")
@options.amp_option
@options.compile_option
@options.device_option
@options.workers_option
@options.threads_option
@options.shard_option
@options.overwrite_option
def command(root, dataset, split, checkpoint, out_dir, scales, flip, crf, crf_iterations, crf_gaussian, crf_bilateral,
            crf_scale, overlay, overlay_alpha, evaluate, batch_size, amp, compile_model, device, workers, threads,
            shard, overwrite):
    """Write label maps of a split with a train-seg checkpoint (multi-scale + flip, optional CRF)."""
    crf_params = None
    if crf:
        try:
            crf_params = dataclasses.replace(POSTPROCESS_CRF, iterations=crf_iterations, gaussian_sxy=crf_gaussian[0],
                                             gaussian_compat=crf_gaussian[1], bilateral_sxy=crf_bilateral[0],
                                             bilateral_srgb=crf_bilateral[1], bilateral_compat=crf_bilateral[2],
                                             scale=crf_scale)
        except ValueError as err:
            raise click.UsageError(f"--crf-*: {err}") from None
    cfg = PredictConfig(root=root, checkpoint=checkpoint, out_dir=out_dir, dataset=dataset, split=split, scales=scales,
                        flip=flip, crf=crf_params, overlay=overlay, overlay_alpha=overlay_alpha, evaluate=evaluate,
                        batch_size=batch_size, amp=amp, compile_model=compile_model, device=device, workers=workers,
                        threads=threads, shard=shard, overwrite=overwrite)
    metrics = run(cfg)
    if not dist_info().is_main:
        return
    click.echo(f"{metrics['predicted']} predicted, {metrics['skipped']} skipped -> {cfg.out_dir}")
    if "miou" in metrics:
        click.echo(f"{cfg.split} mIoU {metrics['miou']:.4f}")
