"""``wsss predict``: label maps of a split, or of any image files, from a ``train-seg`` checkpoint.

The images are a prepared split (``--root``, ``--split``) or files and folders (``--images``;
folders are searched recursively, classes come from the checkpoint).  Every image is segmented
at full resolution: the softmax probabilities of each of ``--scales`` and of its mirror image are
averaged (images whose longer side exceeds ``--max-side`` are scaled down for the network, and
the average scaled back up), optionally refined by a dense CRF (``--crf``), and the argmax is
written as a VOC palette PNG ``<out>/<id>.png``.  Beside it go ``<out>/scores/<id>.json``
(each class's area, the fraction of pixels labelled with it, and score, its highest pixel
probability), ``<out>/scores.csv`` (a row per image) and, with ``--overlay``, a colour overlay
``<out>/overlay/<id>.jpg``.
Finished images are skipped unless ``--overwrite``; under ``torchrun`` every rank
(and with ``--shard I/N`` every shard) predicts its share of the ids.
Up to ``--batch-size`` images of one size share each forward pass; probabilities
are averaged and the argmax taken on the device, and only the uint8 label map
(the probabilities with ``--crf``) comes back to the host.  The CRF runs in
``--workers`` processes while the network segments the next batch.
``--eval`` scores the predictions against ground truth afterwards (the same
as ``wsss eval --pred <out>``).  ``--checkpoint`` is a ``.pth`` file or a
train-seg output folder (its ``best.pth``, or ``last.pth`` when it was
trained without validation).

The ``--crf-*`` defaults are DeepLab-v2's post-processing settings
(:data:`wsss.crf.POSTPROCESS_CRF`).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import click
import numpy as np

from wsss import artifacts
from wsss.crf import POSTPROCESS_CRF, CrfParams
from wsss.errors import WsssError
from wsss.seg_choices import MAX_SIDE, PREDICT_FLIP, PREDICT_SCALES
from wsss.settings import Settings, fail, setting
from wsss.stages.options import (ROOT_HELP, amp_setting, cli_fields, compile_setting, dataset_setting, device_setting,
                                 folder_problem, limit_setting, overwrite_setting, positive_scales, settings_command,
                                 shard_setting, threads_setting)

if TYPE_CHECKING:
    import torch

    from wsss.device import DistInfo
    from wsss.training import Precision

log = logging.getLogger(__name__)

OVERLAY_DIR = "overlay"
SCORES_DIR = "scores"
SCORES_TABLE = "scores.csv"


def images_problem(paths: tuple[Path, ...]) -> str | None:
    """What is wrong with ``--images`` before any work (a path that does not exist), or None."""
    missing = [str(path) for path in paths if not Path(path).exists()]
    return f"no such file or folder: {', '.join(missing)}" if missing else None


@dataclass(frozen=True)
class PredictConfig(Settings):
    """Options of ``wsss predict`` (see ``wsss predict --help``); :attr:`applied_crf` is the CRF that runs."""

    checkpoint: Path = setting(help="best.pth or last.pth of `wsss train-seg`, or its output folder (best.pth, else "
                                    "last.pth).")
    out_dir: Path = setting(help="Output folder for <id>.png label maps, scores/<id>.json, scores.csv, config.json "
                                 "and metrics.json.", option="--out", validate=folder_problem)
    images: tuple[Path, ...] = setting((), "An image file, or a folder searched recursively for "
                                           f"{' '.join(artifacts.IMAGE_SUFFIXES)} files; repeat for more. Segments "
                                           "them instead of a split (no --root).", repeat=True, metavar="PATH",
                                       validate=images_problem)
    root: Path | None = setting(None, f"{ROOT_HELP} Its --split is segmented (not with --images).",
                                validate=folder_problem)
    dataset: str | None = dataset_setting()
    split: str = setting("val", "Split of --root to segment.")
    scales: tuple[float, ...] = setting(PREDICT_SCALES, "Comma-separated test-time scales.", above=0,
                                        parse=positive_scales)
    flip: bool = setting(PREDICT_FLIP, "Also average the mirrored image.")
    max_side: int | None = setting(MAX_SIDE, "Longest side (pixels) the network sees at scale 1: a larger image is "
                                             "scaled down for it (and for --crf), and the result scaled back up to "
                                             "full size; none = never.", at_least=16)
    crf: bool = setting(False, "Dense-CRF post-processing with the --crf-* settings.")
    crf_params: CrfParams = setting(factory=lambda: POSTPROCESS_CRF, prefix="crf",
                                    help="The dense CRF of --crf (DeepLab-v2's post-processing values by default).")
    overlay: bool = setting(False, f"Also write colour overlays to <out>/{OVERLAY_DIR}/<id>.jpg.")
    overlay_alpha: float = setting(0.5, "Opacity of the label colours in the overlays.", at_least=0, at_most=1)
    evaluate: bool = setting(False, "Score the predictions against ground truth afterwards.", option="--eval")
    batch_size: int = setting(4, "Images of equal size per forward pass.", at_least=1)
    limit: int | None = limit_setting()
    amp: str = amp_setting()
    compile_model: bool = compile_setting()
    device: str = device_setting()
    workers: int | None = setting(None, "DataLoader worker processes that decode images and, with --crf, processes "
                                        "that run the CRF (default: min(cores, 4)).", at_least=0)
    threads: int | None = threads_setting()
    shard: tuple[int, int] = shard_setting()
    overwrite: bool = overwrite_setting()

    def check(self) -> None:
        if not self.scales:
            fail("--scales", "none given: need one or more positive factors")
        if self.images and self.root is not None:
            fail("--images", "with --root: segment either a prepared split (--root, --split) or image files")
        if not self.images and self.root is None:
            fail("--root", "missing: give --root (and --split) or --images")
        if self.images and self.evaluate:
            fail("--eval", "with --images: image files have no ground truth to score against")
        index, count = self.shard
        if self.evaluate and count > 1:
            fail("--eval", f"with --shard {index}/{count}: --eval scores the whole split; run `wsss eval --pred` "
                           "once every --shard has finished")

    @property
    def applied_crf(self) -> CrfParams | None:
        """The CRF the label maps go through: :attr:`crf_params` with ``--crf``, else None."""
        return self.crf_params if self.crf else None

    @property
    def source(self) -> str:
        """What is segmented, for progress and messages: the split's name, or ``images``."""
        return "images" if self.images else self.split


def _label_settings(config: dict) -> tuple[dict, dict | None]:
    """What decides a label map besides the checkpoint, from the ``config`` of a config.json.

    Returns:
        ``({"scales", "flip", "max_side"}, the CRF's parameters or None)``; a config.json written before
        ``--crf`` became a flag beside the ``--crf-*`` group held the parameters (or null) under ``crf``, and
        one written before ``--max-side`` segmented every image at full size (None).
    """
    crf = config["crf"]
    params = (config["crf_params"] if crf else None) if isinstance(crf, bool) else crf
    return {"scales": config["scales"], "flip": config["flip"], "max_side": config.get("max_side")}, params


def _check_previous_run(cfg: PredictConfig, checkpoint_file: Path, step) -> None:
    """Refuse to resume into a folder predicted with another checkpoint or other settings (files would mix)."""
    previous = None if cfg.overwrite else artifacts.previous_config(cfg.out_dir, cfg.shard)
    if previous is None:
        return
    try:
        before, crf_before = _label_settings(previous["config"])
        made_by = (previous["checkpoint_file"], previous["checkpoint_step"])
    except (KeyError, TypeError):
        return  # a config.json without the settings: nothing to compare
    now, crf_now = _label_settings(artifacts.jsonable(cfg))
    options = {path: option for path, _, _, option, _ in cli_fields(PredictConfig)}
    changed = [options[(name,)] for name in before if before[name] != now[name]]
    if (crf_before is None) != (crf_now is None):
        changed.append(options[("crf",)])
    elif crf_now is not None:
        changed += [options[("crf_params", name)] for name in crf_now if crf_before.get(name) != crf_now[name]]
    if made_by != (str(checkpoint_file), step):
        changed.insert(0, "--checkpoint")
    if changed:
        path = artifacts.config_path(cfg.out_dir, cfg.shard)
        raise WsssError(f"{path}: {cfg.out_dir} was predicted with other settings ({', '.join(changed)}); "
                        "pass --overwrite or choose another --out")


def scores_path(out_dir: str | Path, image_id: str) -> Path:
    """``<out>/scores/<id>.json``: an image's class scores (see :func:`_class_scores`)."""
    return Path(out_dir) / SCORES_DIR / f"{image_id}.json"


def _is_done(cfg: PredictConfig, image_id: str, num_classes: int | None = None) -> bool:
    """True when the label map, its scores (and overlay) exist and are valid (anything unreadable is redone)."""
    try:
        artifacts.read_label_png(artifacts.label_path(cfg.out_dir, image_id), num_classes)
        artifacts.read_json(scores_path(cfg.out_dir, image_id), dict)
    except WsssError:
        return False
    return not cfg.overlay or artifacts.overlay_path(Path(cfg.out_dir) / OVERLAY_DIR, image_id).is_file()


def _class_scores(label: np.ndarray, peaks: np.ndarray, classes: list[str]) -> dict:
    """Each class's ``area`` (fraction of the label map's pixels) and ``score`` (its highest pixel probability)."""
    areas = np.bincount(label.ravel(), minlength=len(classes))[:len(classes)] / label.size
    return {name: {"area": round(float(area), 6), "score": round(float(peak), 6)}
            for name, area, peak in zip(classes, areas, peaks)}


def _write(cfg: PredictConfig, image_id: str, label: np.ndarray, image: np.ndarray | None, peaks: np.ndarray,
           classes: list[str], file: str) -> None:
    """Write one label map, its scores (and overlay); with a CRF, ``label`` holds the probabilities [C, h, w]
    (at the --max-side size for a larger image: :func:`wsss.crf.crf_label`)."""
    crf = cfg.applied_crf
    if crf is not None:
        from wsss.crf import crf_label

        label = crf_label(image, label, crf)
    artifacts.write_label_png(artifacts.label_path(cfg.out_dir, image_id), label)
    artifacts.write_json(scores_path(cfg.out_dir, image_id),
                         {"id": image_id, "file": file, "height": label.shape[0], "width": label.shape[1],
                          "classes": _class_scores(label, peaks, classes)})
    if cfg.overlay:
        from wsss.visualize import overlay_label

        artifacts.write_image(artifacts.overlay_path(Path(cfg.out_dir) / OVERLAY_DIR, image_id),
                              overlay_label(image, label, cfg.overlay_alpha))


def write_predictions(model, batches: Iterator, cfg: PredictConfig, total: int, files: dict[str, str],
                      classes: list[str], precision: Precision, info: DistInfo) -> None:
    """Segment the ``(ids, images, _)`` batches and write their label maps, scores (and overlays)."""
    import torch

    from wsss.inference import BackgroundWriter, to_model_input
    from wsss.progress import bar as progress_bar
    from wsss.segmentation import segment_batch, upsample_probs

    with_crf = cfg.applied_crf is not None
    keep_images = cfg.overlay or with_crf
    # the CRF (seconds per VOC image) runs in --workers processes, beside the network; plain writes on a thread
    crf_processes = _workers(cfg) if with_crf and total > 1 else 0
    with BackgroundWriter(processes=crf_processes) as writer, \
            progress_bar(total=total, desc=f"predict {cfg.source}", show=info.is_main) as bar:
        for batch_ids, images, _ in batches:
            # at the --max-side size; full-size probabilities of a large photo are made one image at a time
            probs = segment_batch(model, to_model_input(images), cfg.scales, cfg.flip, precision, cfg.max_side,
                                  full_size=False)
            peaks = probs.amax((2, 3)).cpu().numpy()
            # the CRF needs the probabilities; otherwise only the uint8 argmax leaves the device
            size = tuple(images.shape[1:3])
            results = probs.cpu().numpy() if with_crf else [
                upsample_probs(probs[index:index + 1], size).argmax(1)[0].to(torch.uint8).cpu().numpy()
                for index in range(len(batch_ids))]
            pictures = images.cpu().numpy() if keep_images else [None] * len(batch_ids)
            for image_id, result, picture, peak in zip(batch_ids, results, pictures, peaks):
                writer.submit(_write, cfg, image_id, result, picture, peak, classes, files[image_id])
            bar.update(len(batch_ids))


def write_scores_table(out_dir: str | Path, ids: list[str], classes: list[str]) -> Path:
    """``<out>/scores.csv`` from the images' ``scores/<id>.json``: id, file, then each class's area and score."""
    buffer = io.StringIO()
    table = csv.writer(buffer, lineterminator="\n")
    table.writerow(["id", "file", *(f"{name} area" for name in classes), *(f"{name} score" for name in classes)])
    for image_id in ids:
        scores = artifacts.read_json(scores_path(out_dir, image_id), dict)
        per_class = [scores["classes"][name] for name in classes]
        table.writerow([image_id, scores["file"], *(entry["area"] for entry in per_class),
                        *(entry["score"] for entry in per_class)])
    path = Path(out_dir) / SCORES_TABLE
    with artifacts.atomic_write(path, "w") as handle:
        handle.write(buffer.getvalue())
    return path


def _workers(cfg: PredictConfig) -> int:
    from wsss.device import default_workers

    return min(default_workers(), 4) if cfg.workers is None else cfg.workers


def run(cfg: PredictConfig) -> dict:
    """Predict every image of the split or of ``--images`` (skipping finished ones); return the metrics written."""
    from wsss.datasets.prepared import PreparedDataset

    # the inputs first: a missing image or split stops the command before torch and the checkpoint load
    if cfg.images:
        paths = artifacts.find_images(cfg.images, skip=cfg.out_dir)
        ids, dataset = list(paths)[:cfg.limit], None
        files = {image_id: str(path) for image_id, path in paths.items()}
    else:
        dataset = PreparedDataset.load(cfg.root, cfg.dataset)
        if cfg.evaluate and not dataset.has_masks(cfg.split):
            raise WsssError(f"--eval: split {cfg.split!r} of {cfg.root} has no ground-truth masks")
        ids = dataset.ids(cfg.split)[:cfg.limit]
        if not ids:
            raise WsssError(f"{cfg.root}: split {cfg.split!r} has no images")
        files = {image_id: str(dataset.image_path(cfg.split, image_id)) for image_id in ids}

    from wsss.device import shard, sum_over_ranks
    from wsss.inference import file_batches, split_batches
    from wsss.models.backbones import prepare_for_inference
    from wsss.models.deeplab import checkpoint_classes, model_from_checkpoint
    from wsss.training import maybe_compile, start_runtime

    runtime = start_runtime(cfg.device, cfg.threads, cfg.amp)
    device, info, precision = runtime.device, runtime.info, runtime.precision
    checkpoint_file = artifacts.resolve_checkpoint(cfg.checkpoint)
    checkpoint = artifacts.load_checkpoint(checkpoint_file)
    model = prepare_for_inference(model_from_checkpoint(checkpoint, str(checkpoint_file)).to(device))
    classes = checkpoint_classes(checkpoint, str(checkpoint_file))
    if dataset is not None and classes != list(dataset.classes):
        raise WsssError(f"{checkpoint_file}: trained for classes {classes} but {cfg.root} has {dataset.classes}")
    _check_previous_run(cfg, checkpoint_file, checkpoint.get("step"))
    mine = shard(ids, info, cfg.shard)
    todo = mine if cfg.overwrite else [image_id for image_id in mine if not _is_done(cfg, image_id, len(classes))]
    if len(todo) < len(mine) and info.is_main:
        log.info("skipping %d finished images (pass --overwrite to redo them)", len(mine) - len(todo))
    if info.is_main:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        artifacts.write_config(cfg.out_dir, cfg, shard=cfg.shard, checkpoint_file=str(checkpoint_file),
                               checkpoint_config=checkpoint.get("config"), arch=checkpoint.get("arch"),
                               checkpoint_step=checkpoint.get("step"), classes=classes,
                               world_size=info.world_size, device=str(device), precision=precision.name)
    loader = dict(batch_size=cfg.batch_size, workers=_workers(cfg), device=device)
    batches = (file_batches({image_id: paths[image_id] for image_id in todo}, **loader) if dataset is None
               else split_batches(dataset, cfg.split, todo, **loader))
    started = time.perf_counter()
    write_predictions(maybe_compile(model, cfg.compile_model), batches, cfg, len(todo), files, classes, precision,
                      info)
    seconds = time.perf_counter() - started
    # a collective: it also waits for every rank, so all files exist before rank 0 reads them
    predicted, skipped = (int(value) for value in sum_over_ranks([len(todo), len(mine) - len(todo)], info, device))
    metrics = {"split": None if cfg.images else cfg.split, "checkpoint": str(checkpoint_file), "num_images": len(ids),
               "predicted": predicted, "skipped": skipped, "seconds": round(seconds, 2),
               "images_per_second": round(len(todo) / seconds, 4) if todo and seconds > 0 else None,
               "scales": list(cfg.scales), "flip": cfg.flip, "max_side": cfg.max_side, "crf": cfg.crf,
               "precision": precision.name}
    if info.is_main and cfg.shard[1] == 1:
        metrics["scores"] = str(write_scores_table(cfg.out_dir, ids, classes))
    elif info.is_main:
        log.info("%s is written once every shard has finished: run predict again without --shard (it skips "
                 "every image)", SCORES_TABLE)
    if info.is_main and cfg.evaluate:
        from wsss.evaluation import evaluate_labels

        matrix = evaluate_labels(dataset, cfg.split, cfg.out_dir, ids=ids, workers=cfg.workers)
        metrics["miou"], metrics["eval"] = matrix.miou(), matrix.summary(dataset.classes)
        log.info("%s mIoU %.4f\n%s", cfg.split, metrics["miou"], matrix.table(dataset.classes))
    if info.is_main:
        artifacts.write_metrics(cfg.out_dir, metrics, shard=cfg.shard)
    return metrics


# --------------------------------------------------------------------------- command line


@settings_command(PredictConfig, name="predict")
def command(cfg: PredictConfig) -> None:
    """Write label maps and class scores of a split, or of image files and folders (--images), with a train-seg
    checkpoint (multi-scale + flip, optional CRF)."""
    from wsss.device import dist_info

    metrics = run(cfg)
    if not dist_info().is_main:
        return
    click.echo(f"{metrics['predicted']} predicted, {metrics['skipped']} skipped -> {cfg.out_dir}")
    if "miou" in metrics:
        click.echo(f"{cfg.split} mIoU {metrics['miou']:.4f}")
