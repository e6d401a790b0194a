"""``wsss make-cam``: class activation maps of every image of a split (stage 2).

For every image: the classifier runs at each of ``--scales`` with the flipped
image in the same batch, the ReLU'd class maps of every view are sampled at the
original pixels (:func:`wsss.cam.feature_to_image`), summed and max-normalised
per class.  CAMs are kept for the classes in the image-level labels
(``--classes gt``) or for the classes whose score ``sigmoid(logit)`` reaches
``--score-thresh`` (``--classes pred``, for images without labels).

``--erase-steps N`` (default 0) adds inference-time adversarial erasing
(:func:`wsss.cam.erasing_cams`): N times, the pixels whose accumulated CAM
reaches ``--erase-thresh`` are erased and the CAM of what remains is added,
until the classifier's score for the class on what remains falls below
``--erase-stop`` (adversarial erasing's stopping rule).
It is off by default because ``bench/ablation.md`` measures no gain from it
through DeepLab, nor ``bench/partial_cams.md`` on partial CAMs.

Speed: up to ``--batch-size`` images of one size share every forward pass
(:mod:`wsss.inference`), DataLoader workers decode, normalisation and max-normalisation
run on the device, and only float16 CAMs come back to be written by a background thread.

Output: ``<out>/<id>.npz`` per image (keys int16 [K], cams float16 [K, H, W]),
``config.json`` and ``metrics.json`` (images/s; with ``--eval`` the threshold
sweep of ``wsss eval --cams``).  Finished images are skipped unless
``--overwrite``; under torchrun every rank, and with ``--shard I/N`` every shard,
takes its share of the ids.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from wsss import artifacts, evaluation
from wsss.cam_choices import DEFAULT_SCALES, ERASE_STOP, ERASE_THRESH
from wsss.datasets.prepared import PreparedDataset
from wsss.device import DistInfo, default_workers, dist_info, shard, sum_over_ranks
from wsss.errors import WsssError
from wsss.progress import bar as progress_bar
from wsss.settings import Settings, fail, setting
from wsss.stages.options import (amp_setting, compile_setting, dataset_setting, device_setting, folder_problem,
                                 limit_setting, loader_workers_setting, overwrite_setting, positive_scales,
                                 root_setting, settings_command, shard_setting, sweep_setting, threads_setting)

if TYPE_CHECKING:
    import torch

    from wsss.training import Precision

log = logging.getLogger(__name__)

CLASS_SOURCES = ("gt", "pred")


@dataclass(frozen=True)
class MakeCamConfig(Settings):
    """Options of ``wsss make-cam`` (see ``wsss make-cam --help``)."""

    root: Path = root_setting()
    checkpoint: Path = setting(help="train-cls checkpoint (.pth), or its output folder (best.pth, else last.pth).")
    out_dir: Path = setting(help="Output folder for <id>.npz, config.json and metrics.json.", option="--out",
                            validate=folder_problem)
    dataset: str | None = dataset_setting()
    split: str = setting("train", "Split to compute CAMs for (the CAM protocol scores VOC train).")
    scales: tuple[float, ...] = setting(DEFAULT_SCALES, "Comma-separated input scales.", above=0,
                                        parse=positive_scales)
    flip: bool = setting(True, "Add the mirrored image at every scale.")
    classes: str = setting("gt", "gt: the image-level labels; pred: the classes the classifier predicts "
                                 "(unlabelled images).", choices=CLASS_SOURCES)
    score_thresh: float = setting(0.5, "With --classes pred: keep classes with sigmoid score >= this.",
                                  at_least=0, at_most=1)
    erase_steps: int = setting(0, "Inference-time adversarial erasing steps (0 = plain CAM; each step costs about "
                                  "one CAM pass per class of the image).  Off by default: bench/ablation.md "
                                  "measures no gain through DeepLab.", at_least=0)
    erase_thresh: float = setting(ERASE_THRESH, "Erase pixels whose accumulated normalised CAM is >= this.",
                                  above=0, at_most=1)
    erase_stop: float = setting(ERASE_STOP, "Stop erasing a class once the classifier's score for it on the erased "
                                            "image is below this (what remains no longer shows it: adversarial "
                                            "erasing's stopping rule, e.g. 0.5); 0 never stops.", at_least=0, at_most=1)
    batch_size: int = setting(8, "Images of equal size per forward pass.", at_least=1)
    limit: int | None = limit_setting()
    evaluate: bool = setting(False, "Afterwards run the threshold sweep of `wsss eval --cams`.", option="--eval")
    sweep: tuple[float, float, float] = sweep_setting(evaluation.DEFAULT_SWEEP, "With --eval: background "
                                                      "thresholds start:stop:step (stop inclusive).")
    amp: str = amp_setting()
    compile_model: bool = compile_setting()
    device: str = device_setting()
    workers: int | None = loader_workers_setting()
    threads: int | None = threads_setting()
    shard: tuple[int, int] = shard_setting()
    overwrite: bool = overwrite_setting()

    def check(self) -> None:
        if not self.scales:
            fail("--scales", "none given: need at least one positive scale")
        index, count = self.shard
        if self.evaluate and count > 1:
            fail("--eval", f"with --shard {index}/{count}: --eval scores the whole split; run `wsss eval --cams` "
                           "once every --shard has finished")


def run(cfg: MakeCamConfig) -> dict:
    """Write the CAMs of a split; return the metrics written to ``<out>/metrics.json``."""
    # the network and torch are imported here and in write_cams, not at the top, so that `wsss make-cam --help`
    # does not load them
    from wsss.inference import load_cam_network
    from wsss.training import start_runtime

    runtime = start_runtime(cfg.device, cfg.threads, cfg.amp)
    device, info, precision = runtime.device, runtime.info, runtime.precision
    dataset = PreparedDataset.load(cfg.root, cfg.dataset)
    checkpoint_file = artifacts.resolve_checkpoint(cfg.checkpoint)
    model, checkpoint = load_cam_network(checkpoint_file, dataset, device, cfg.compile_model)
    ids = dataset.ids(cfg.split)[:cfg.limit]
    if not ids:
        raise WsssError(f"{cfg.root}: split {cfg.split!r} has no images")
    out_dir = Path(cfg.out_dir)
    mine = shard(ids, info, cfg.shard)
    todo = [image_id for image_id in mine if cfg.overwrite
            or not artifacts.cam_is_complete(artifacts.cam_path(out_dir, image_id), dataset.num_classes)]
    if cfg.classes == "gt":
        for image_id in todo:
            dataset.image_labels(image_id)  # fail before the long loop, naming the labels file
    log.info("make-cam: %d of %d images to do (%d finished)", len(todo), len(mine), len(mine) - len(todo))
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        artifacts.write_config(out_dir, cfg, shard=cfg.shard, checkpoint_file=str(checkpoint_file),
                               arch=checkpoint["arch"], classes=dataset.classes, world_size=info.world_size,
                               device=str(device), precision=precision.name)
    started = time.perf_counter()
    no_class, shown_counts = write_cams(model, dataset, cfg, todo, device, precision, info)
    seconds = time.perf_counter() - started
    # totals over ranks; a collective, so every CAM file exists before rank 0 evaluates
    done, skipped, no_class, rate, *shown = sum_over_ranks(
        [len(todo), len(mine) - len(todo), no_class, len(todo) / seconds if todo and seconds > 0 else 0.0,
         *shown_counts.flatten().tolist()], info, device)
    if no_class:
        log.warning("%d image(s) got no class (%s); their CAM files hold no planes", no_class,
                    "no image-level label" if cfg.classes == "gt" else f"no score >= {cfg.score_thresh}")
    metrics = {"split": cfg.split, "num_images": len(ids), "processed": int(done), "skipped": int(skipped),
               "no_class": int(no_class), "seconds": round(seconds, 3),
               "images_per_second": round(rate, 4) if rate else None, "scales": list(cfg.scales), "flip": cfg.flip,
               "classes": cfg.classes, "erase_steps": cfg.erase_steps, "erase_stop": cfg.erase_stop,
               "erasing": _erasing_record(shown), "precision": precision.name}
    if cfg.evaluate and info.is_main:
        metrics["eval"] = _evaluate(cfg, dataset, ids)
    if info.is_main:
        artifacts.write_metrics(out_dir, metrics, shard=cfg.shard)
    return metrics


def _erasing_record(shown: list[float]) -> list[dict]:
    """Per erasing step of this run's images: how many (image, class) pairs were erased, the share the
    classifier still recognised on what remained (score >= 0.5) and their mean score.  A high share says
    the objects hold evidence beyond their CAMs' peaks (partial CAMs, which erasing can grow); a low one
    that the peak was all the classifier had."""
    record = []
    for pairs, recognised, total in zip(shown[0::3], shown[1::3], shown[2::3]):
        record.append({"pairs": int(pairs), "recognised": round(recognised / pairs, 4) if pairs else None,
                       "mean_score": round(total / pairs, 4) if pairs else None})
    return record


def _channels_of(cfg: MakeCamConfig, dataset: PreparedDataset, batch_ids: list[str]):
    """The foreground channels per image: its labels (gt), or a function of the scores (pred)."""
    if cfg.classes == "gt":
        return [[label - 1 for label in dataset.image_labels(image_id)] for image_id in batch_ids]
    return lambda logits: [row.nonzero().flatten().tolist() for row in logits.sigmoid() >= cfg.score_thresh]


def write_cams(model, dataset: PreparedDataset, cfg: MakeCamConfig, ids: list[str], device: torch.device,
               precision: Precision, info: DistInfo) -> tuple[int, torch.Tensor]:
    """Compute and write the CAMs of ``ids``; return how many images got no class and the erasing steps'
    counts (:func:`wsss.cam.erasing_cams`' ``shown_counts``, [erase_steps, 3])."""
    import torch

    from wsss.cam import erasing_cams, max_normalize, multiscale_cam
    from wsss.inference import BackgroundWriter, split_batches, to_model_input

    workers = min(default_workers(), 4) if cfg.workers is None else cfg.workers
    no_class = 0
    # per erasing step: [pairs, still recognised, sum of scores], summed on the device
    shown_counts = torch.zeros(cfg.erase_steps, 3, dtype=torch.float64, device=device)
    with progress_bar(total=len(ids), desc="make-cam", show=info.is_main) as bar, BackgroundWriter() as writer:
        for batch_ids, images, _ in split_batches(dataset, cfg.split, ids, batch_size=cfg.batch_size,
                                                  workers=workers, device=device):
            inputs = to_model_input(images)
            chosen: list[list[int]] = []
            selection = _channels_of(cfg, dataset, batch_ids)

            def remember(logits, selection=selection):
                picked = selection(logits) if callable(selection) else selection
                chosen.extend(list(channels) for channels in picked)
                return picked

            with torch.inference_mode(), precision.autocast(device):
                cams, _ = multiscale_cam(model, inputs, remember, scales=cfg.scales, flip=cfg.flip)
                if cfg.erase_steps > 0:
                    cams = erasing_cams(model, inputs, chosen, erase_steps=cfg.erase_steps,
                                        erase_thresh=cfg.erase_thresh, erase_stop=cfg.erase_stop, scales=cfg.scales,
                                        flip=cfg.flip, first=cams, shown_counts=shown_counts,
                                        chunk=cfg.batch_size)
                else:
                    cams = [max_normalize(cam) for cam in cams]
                normalised = torch.cat(cams).half().cpu().numpy()
            offsets = np.cumsum([0] + [len(channels) for channels in chosen])
            for index, image_id in enumerate(batch_ids):
                keys = np.asarray(chosen[index], dtype=np.int64) + 1
                no_class += not len(keys)
                writer.submit(artifacts.write_cam, artifacts.cam_path(cfg.out_dir, image_id), keys,
                              normalised[offsets[index]:offsets[index + 1]])
            bar.update(len(batch_ids))
    return no_class, shown_counts


def _evaluate(cfg: MakeCamConfig, dataset: PreparedDataset, ids: list[str]) -> dict:
    """The background-threshold sweep of ``wsss eval --cams`` on the written CAMs, saved beside them."""
    if not dataset.has_masks(cfg.split):
        raise WsssError(f"--eval: split {cfg.split!r} of {dataset.root} has no ground-truth masks")
    result = evaluation.folder_report(dataset, cfg.split, cfg.out_dir, cams=True, ids=ids, workers=cfg.workers,
                                      thresholds=evaluation.threshold_range(*cfg.sweep))
    report = result.pop("report")
    out_file = artifacts.eval_metrics_path(cfg.out_dir, cfg.split)
    artifacts.write_json(out_file, {**result, "provenance": artifacts.provenance(cfg)})
    log.info("CAM mIoU on %s: %.4f at threshold %.2f", cfg.split, result["miou"], result["best_threshold"])
    return {"miou": result["miou"], "best_threshold": result["best_threshold"], "sweep": result["sweep"],
            "report_file": str(out_file), "report": report}


# --------------------------------------------------------------------------- command line


@settings_command(MakeCamConfig, name="make-cam")
def command(cfg: MakeCamConfig) -> None:
    """Write max-normalised CAMs <OUT>/<id>.npz for every image of a split."""
    metrics = run(cfg)
    if not dist_info().is_main:
        return
    line = f"CAMs of {metrics['processed']} images ({metrics['skipped']} already done)"
    if metrics["images_per_second"] is not None:
        line += f", {metrics['images_per_second']:.2f} images/s"
    click.echo(line)
    if "eval" in metrics:
        click.echo(metrics["eval"]["report"])
