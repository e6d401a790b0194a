"""``wsss make-cam``: class activation maps of every image of a split (stage 2).

For every image: the classifier runs at each of ``--scales`` with the flipped
image in the same batch, the ReLU'd class maps of every view are sampled at the
original pixels (:func:`wsss.cam.feature_to_image`), summed and max-normalised
per class.  CAMs are kept for the classes in the image-level labels
(``--classes gt``) or for the classes whose score ``sigmoid(logit)`` reaches
``--score-thresh`` (``--classes pred``, for images without labels).

``--erase-steps N`` adds inference-time adversarial erasing
(:func:`wsss.cam.erasing_cam`): N times, the pixels whose accumulated CAM
reaches ``--erase-thresh`` are erased and the CAM of what remains is added.

Output: ``<out>/<id>.npz`` per image (keys int16 [K], cams float16 [K, H, W]),
``config.json`` and ``metrics.json`` (images/s; with ``--eval`` the threshold
sweep of ``wsss eval --cams``).  Finished images are skipped unless
``--overwrite``; under torchrun every rank takes its share of the ids.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
from torch.utils.data import DataLoader

from stages import options
from wsss import artifacts, evaluation
from wsss.cam import DEFAULT_SCALES, erasing_cam, max_normalize, multiscale_cam
from wsss.datasets.prepared import PreparedDataset
from wsss.datasets.torch_data import InferenceDataset, collate_single
from wsss.device import default_workers, dist_info, init_distributed, resolve_device, shard, sum_over_ranks
from wsss.errors import WsssError
from wsss.models.classifier import load_classifier, prepare_for_inference
from wsss.progress import bar as progress_bar
from wsss.transforms import normalize_image

log = logging.getLogger(__name__)

CLASS_SOURCES = ("gt", "pred")


@dataclass(frozen=True)
class MakeCamConfig:
    """Options of ``wsss make-cam`` (see ``wsss make-cam --help``)."""

    root: Path
    checkpoint: Path
    out_dir: Path
    dataset: str | None = None
    split: str = "train"
    scales: tuple[float, ...] = DEFAULT_SCALES
    flip: bool = True
    classes: str = "gt"
    score_thresh: float = 0.5
    erase_steps: int = 0
    erase_thresh: float = 0.5
    batch_size: int = 1
    limit: int | None = None
    evaluate: bool = False
    sweep: tuple[float, float, float] = evaluation.DEFAULT_SWEEP
    device: str = "auto"
    workers: int | None = None
    overwrite: bool = False


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file, or a train-cls output folder (its ``best.pth``)."""
    path = Path(path)
    if path.is_dir():
        return artifacts.checkpoint_path(path, "best")
    return path


def _batches(loader, batch_size: int):
    """Group consecutive images of equal size into lists of at most ``batch_size`` items."""
    pending: list[dict] = []
    for item in loader:
        if pending and (len(pending) >= batch_size or tuple(item["size"]) != tuple(pending[0]["size"])):
            yield pending
            pending = []
        pending.append(item)
    if pending:
        yield pending


def run(cfg: MakeCamConfig) -> dict:
    """Write the CAMs of a split; return the metrics written to ``<out>/metrics.json``."""
    if cfg.classes not in CLASS_SOURCES:
        raise WsssError(f"--classes {cfg.classes!r}: choose gt or pred")
    if not cfg.scales or min(cfg.scales) <= 0:
        raise WsssError(f"--scales {cfg.scales}: need at least one positive scale")
    if cfg.erase_steps < 0 or not 0 < cfg.erase_thresh <= 1:
        raise WsssError(f"--erase-steps must be >= 0 and --erase-thresh in (0, 1], got {cfg.erase_steps}, "
                        f"{cfg.erase_thresh}")
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    dataset = PreparedDataset.load(cfg.root, cfg.dataset)
    checkpoint_file = resolve_checkpoint(cfg.checkpoint)
    checkpoint = artifacts.load_checkpoint(checkpoint_file)
    if list(checkpoint.get("classes", [])) != list(dataset.classes):
        raise WsssError(f"{checkpoint_file}: the classifier was trained on classes {checkpoint.get('classes')}, "
                        f"but {dataset.root} has {dataset.classes}")
    model = prepare_for_inference(load_classifier(checkpoint, str(checkpoint_file)).to(device))

    ids = dataset.ids(cfg.split)
    if cfg.limit is not None:
        ids = ids[:cfg.limit]
    out_dir = Path(cfg.out_dir)
    mine = shard(ids, info)
    todo = [image_id for image_id in mine
            if cfg.overwrite or not artifacts.cam_is_complete(artifacts.cam_path(out_dir, image_id))]
    if cfg.classes == "gt":
        for image_id in todo:
            dataset.image_labels(image_id)  # fail before the long loop, naming the labels file
    log.info("make-cam: %d of %d images to do (%d finished)", len(todo), len(mine), len(mine) - len(todo))
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        artifacts.write_config(out_dir, cfg, checkpoint_file=str(checkpoint_file), arch=checkpoint["arch"],
                               classes=dataset.classes, world_size=info.world_size, device=str(device))

    workers = min(default_workers(), 4) if cfg.workers is None else cfg.workers
    loader = DataLoader(InferenceDataset(dataset, cfg.split, todo), batch_size=1, collate_fn=collate_single,
                        num_workers=workers)

    def choose(items: list[dict]):
        if cfg.classes == "gt":
            return [[label - 1 for label in dataset.image_labels(item["id"])] for item in items]
        return lambda logits: [torch.nonzero(torch.sigmoid(row) >= cfg.score_thresh).flatten().tolist()
                               for row in logits]

    started = time.perf_counter()
    done = 0
    no_class = 0
    with progress_bar(total=len(todo), desc="make-cam", show=info.is_main) as bar:
        for items in _batches(loader, cfg.batch_size):
            images = torch.stack([normalize_image(item["image"]) for item in items]).to(device)
            selection = choose(items)
            chosen: list[list[int]] = []

            def remember(logits, selection=selection):
                picked = selection(logits) if callable(selection) else selection
                chosen.extend(picked)
                return picked

            cams, _ = multiscale_cam(model, images, remember, scales=cfg.scales, flip=cfg.flip)
            for index, item in enumerate(items):
                channels = chosen[index]
                if cfg.erase_steps > 0 and channels:
                    normalised = erasing_cam(model, images[index], channels, erase_steps=cfg.erase_steps,
                                             erase_thresh=cfg.erase_thresh, scales=cfg.scales, flip=cfg.flip,
                                             first=cams[index])
                else:
                    normalised = max_normalize(cams[index])
                no_class += not channels
                keys = np.asarray(channels, dtype=np.int64) + 1
                artifacts.write_cam(artifacts.cam_path(out_dir, item["id"]), keys, normalised.float().cpu().numpy())
            done += len(items)
            bar.update(len(items))
    seconds = time.perf_counter() - started
    images_per_second = done / seconds if done and seconds > 0 else None
    if no_class:
        log.warning("%d image(s) got no class (%s); their CAM files hold no planes", no_class,
                    "no image-level label" if cfg.classes == "gt" else f"no score >= {cfg.score_thresh}")
    if images_per_second is not None:
        log.info("make-cam: %d images in %.1f s (%.3f images/s)", done, seconds, images_per_second)
    # totals over ranks; a collective, so every CAM file exists before rank 0 evaluates
    done, skipped, no_class, images_per_second = sum_over_ranks(
        [done, len(mine) - len(todo), no_class, images_per_second or 0.0], info, device)
    metrics = {"split": cfg.split, "num_images": len(ids), "processed": int(done), "skipped": int(skipped),
               "no_class": int(no_class), "seconds": round(seconds, 3),
               "images_per_second": round(images_per_second, 4) if images_per_second else None,
               "scales": list(cfg.scales), "flip": cfg.flip, "classes": cfg.classes, "erase_steps": cfg.erase_steps}
    if cfg.evaluate and info.is_main:
        metrics["eval"] = _evaluate(cfg, dataset, ids)
    if info.is_main:
        artifacts.write_metrics(out_dir, metrics)
    return metrics


def _evaluate(cfg: MakeCamConfig, dataset: PreparedDataset, ids: list[str]) -> dict:
    """The background-threshold sweep of ``wsss eval --cams`` on the written CAMs."""
    from stages import evaluate

    if not dataset.has_masks(cfg.split):
        raise WsssError(f"--eval: split {cfg.split!r} of {dataset.root} has no ground-truth masks")
    result = evaluate.run(evaluate.EvalConfig(root=cfg.root, split=cfg.split, cam_dir=cfg.out_dir,
                                              dataset=cfg.dataset, sweep=cfg.sweep, workers=cfg.workers,
                                              allow_missing=len(ids) < len(dataset.ids(cfg.split))))
    log.info("CAM mIoU on %s: %.4f at threshold %.2f", cfg.split, result["miou"], result["best_threshold"])
    return {"miou": result["miou"], "best_threshold": result["best_threshold"], "sweep": result["sweep"],
            "report_file": result["out_file"], "report": result["report"]}


# --------------------------------------------------------------------------- command line


@click.command(short_help="Class activation maps of a split (multi-scale, flip, erasing).")
@options.root_option()
@options.dataset_option()
@options.split_option("train", "Split to compute CAMs for (the CAM protocol scores VOC train).")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True,
              help="train-cls checkpoint (.pth), or its output folder (uses best.pth).")
@options.out_option("Output folder for <id>.npz, config.json and metrics.json.")
@click.option("--scales", default=",".join(str(s) for s in DEFAULT_SCALES), show_default=True, callback=options.positive_scales,
              help="Comma-separated input scales.")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Add the mirrored image at every scale.")
@click.option("--classes", type=click.Choice(CLASS_SOURCES), default="gt", show_default=True,
              help="gt: the image-level labels; pred: the classes the classifier predicts (unlabelled images).")
@click.option("--score-thresh", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="With --classes pred: keep classes with sigmoid score >= this.")
@click.option("--erase-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Inference-time adversarial erasing steps (0 = plain CAM).")
@click.option("--erase-thresh", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Erase pixels whose accumulated normalised CAM is >= this.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images of equal size per forward pass.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N images of the split.")
@click.option("--eval", "evaluate", is_flag=True, help="Afterwards run the threshold sweep of `wsss eval --cams`.")
@click.option("--sweep", default="0.05:0.60:0.01", show_default=True, callback=options.threshold_range,
              help="With --eval: background thresholds start:stop:step (stop inclusive).")
@options.device_option
@options.workers_option
@options.overwrite_option
def command(root, dataset, split, checkpoint, out_dir, scales, flip, classes, score_thresh, erase_steps, erase_thresh,
            batch_size, limit, evaluate, sweep, device, workers, overwrite):
    """Write max-normalised CAMs <OUT>/<id>.npz for every image of a split."""
    metrics = run(MakeCamConfig(root=root, checkpoint=checkpoint, out_dir=out_dir, dataset=dataset, split=split,
                                scales=scales, flip=flip, classes=classes, score_thresh=score_thresh,
                                erase_steps=erase_steps, erase_thresh=erase_thresh, batch_size=batch_size,
                                limit=limit, evaluate=evaluate, sweep=sweep, device=device, workers=workers,
                                overwrite=overwrite))
    if not dist_info().is_main:
        return
    line = f"CAMs of {metrics['processed']} images ({metrics['skipped']} already done)"
    if metrics["images_per_second"] is not None:
        line += f", {metrics['images_per_second']:.2f} images/s"
    click.echo(line)
    if "eval" in metrics:
        click.echo(metrics["eval"]["report"])
