"""``wsss predict``: label maps of a split from a ``train-seg`` checkpoint.

Every image is segmented at full resolution: the softmax probabilities of
each of ``--scales`` and of its mirror image are averaged, optionally refined by
a dense CRF (``--crf``), and the argmax is written as a VOC palette PNG
``<out>/<id>.png`` (``--overlay`` adds a colour overlay ``<out>/overlay/<id>.jpg``).
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

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from wsss import artifacts
from wsss.crf import POSTPROCESS_CRF, CrfParams, dense_crf
from wsss.datasets.prepared import PreparedDataset
from wsss.device import DistInfo, default_workers, dist_info, shard, sum_over_ranks
from wsss.errors import WsssError
from wsss.inference import BackgroundWriter, split_batches, to_model_input
from wsss.models.backbones import prepare_for_inference
from wsss.models.deeplab import model_from_checkpoint
from wsss.progress import bar as progress_bar
from wsss.segmentation import segment_batch
from wsss.settings import Settings, fail, setting
from wsss.stages.options import (amp_setting, cli_fields, compile_setting, dataset_setting, device_setting,
                                 folder_problem, overwrite_setting, positive_scales, root_setting, settings_command,
                                 shard_setting, threads_setting)
from wsss.training import Precision, maybe_compile, start_runtime
from wsss.visualize import overlay_label

log = logging.getLogger(__name__)

OVERLAY_DIR = "overlay"


@dataclass(frozen=True)
class PredictConfig(Settings):
    """Options of ``wsss predict`` (see ``wsss predict --help``); :attr:`applied_crf` is the CRF that runs."""

    root: Path = root_setting()
    checkpoint: Path = setting(help="best.pth or last.pth of `wsss train-seg`, or its output folder (best.pth, else "
                                    "last.pth).")
    out_dir: Path = setting(help="Output folder for <id>.png label maps, config.json and metrics.json.",
                            option="--out", validate=folder_problem)
    dataset: str | None = dataset_setting()
    split: str = setting("val", "Split to segment.")
    scales: tuple[float, ...] = setting((0.5, 0.75, 1.0, 1.25, 1.5), "Comma-separated test-time scales.", above=0,
                                        parse=positive_scales)
    flip: bool = setting(True, "Also average the mirrored image.")
    crf: bool = setting(False, "Dense-CRF post-processing with the --crf-* settings.")
    crf_params: CrfParams = setting(factory=lambda: POSTPROCESS_CRF, prefix="crf",
                                    help="The dense CRF of --crf (DeepLab-v2's post-processing values by default).")
    overlay: bool = setting(False, "Also write colour overlays to <out>/overlay/<id>.jpg.")
    overlay_alpha: float = setting(0.5, "Opacity of the label colours in the overlays.", at_least=0, at_most=1)
    evaluate: bool = setting(False, "Score the predictions against ground truth afterwards.", option="--eval")
    batch_size: int = setting(4, "Images of equal size per forward pass.", at_least=1)
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
        index, count = self.shard
        if self.evaluate and count > 1:
            fail("--eval", f"with --shard {index}/{count}: --eval scores the whole split; run `wsss eval --pred` "
                           "once every --shard has finished")

    @property
    def applied_crf(self) -> CrfParams | None:
        """The CRF the label maps go through: :attr:`crf_params` with ``--crf``, else None."""
        return self.crf_params if self.crf else None


def _label_settings(config: dict) -> tuple[dict, dict | None]:
    """What decides a label map besides the checkpoint, from the ``config`` of a config.json.

    Returns:
        ``({"scales", "flip"}, the CRF's parameters or None)``; a config.json written before ``--crf``
        became a flag beside the ``--crf-*`` group held the parameters (or null) under ``crf``.
    """
    crf = config["crf"]
    params = (config["crf_params"] if crf else None) if isinstance(crf, bool) else crf
    return {"scales": config["scales"], "flip": config["flip"]}, params


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
    changed = [options[(name,)] for name in now if before[name] != now[name]]
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


def _is_done(cfg: PredictConfig, image_id: str, num_classes: int | None = None) -> bool:
    """True when the label map (and overlay) exist and are valid (anything unreadable is redone)."""
    try:
        artifacts.read_label_png(artifacts.label_path(cfg.out_dir, image_id), num_classes)
    except WsssError:
        return False
    return not cfg.overlay or artifacts.overlay_path(Path(cfg.out_dir) / OVERLAY_DIR, image_id).is_file()


def _write(cfg: PredictConfig, image_id: str, label: np.ndarray, image: np.ndarray | None) -> None:
    """Write one label map (and overlay); with a CRF, ``label`` holds the probabilities [C, H, W] it refines."""
    crf = cfg.applied_crf
    if crf is not None:
        label = dense_crf(image, label, **crf.kwargs()).argmax(0).astype(np.uint8)
    artifacts.write_label_png(artifacts.label_path(cfg.out_dir, image_id), label)
    if cfg.overlay:
        artifacts.write_image(artifacts.overlay_path(Path(cfg.out_dir) / OVERLAY_DIR, image_id),
                              overlay_label(image, label, cfg.overlay_alpha))


def write_predictions(model, dataset: PreparedDataset, cfg: PredictConfig, ids: list[str], device: torch.device,
                      precision: Precision, info: DistInfo) -> None:
    """Segment ``ids`` in size-bucketed batches and write their label maps (and overlays)."""
    workers = min(default_workers(), 4) if cfg.workers is None else cfg.workers
    with_crf = cfg.applied_crf is not None
    keep_images = cfg.overlay or with_crf
    # the CRF (seconds per VOC image) runs in --workers processes, beside the network; plain writes on a thread
    crf_processes = workers if with_crf and len(ids) > 1 else 0
    with BackgroundWriter(processes=crf_processes) as writer, \
            progress_bar(total=len(ids), desc=f"predict {cfg.split}", show=info.is_main) as bar:
        for batch_ids, images, _ in split_batches(dataset, cfg.split, ids, batch_size=cfg.batch_size,
                                                  workers=workers, device=device):
            probs = segment_batch(model, to_model_input(images), cfg.scales, cfg.flip, precision)
            # the CRF needs the probabilities; otherwise only the uint8 argmax leaves the device
            results = probs.cpu().numpy() if with_crf else probs.argmax(1).to(torch.uint8).cpu().numpy()
            pictures = images.cpu().numpy() if keep_images else [None] * len(batch_ids)
            for image_id, result, picture in zip(batch_ids, results, pictures):
                writer.submit(_write, cfg, image_id, result, picture)
            bar.update(len(batch_ids))


def run(cfg: PredictConfig) -> dict:
    """Predict every image of the split (skipping finished ones) and return the metrics written."""
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
               "scales": list(cfg.scales), "flip": cfg.flip, "crf": cfg.crf, "precision": precision.name}
    if info.is_main and cfg.evaluate:
        from wsss.evaluation import evaluate_labels

        matrix = evaluate_labels(dataset, cfg.split, cfg.out_dir, workers=cfg.workers)
        metrics["miou"], metrics["eval"] = matrix.miou(), matrix.summary(dataset.classes)
        log.info("%s mIoU %.4f\n%s", cfg.split, metrics["miou"], matrix.table(dataset.classes))
    if info.is_main:
        artifacts.write_metrics(cfg.out_dir, metrics, shard=cfg.shard)
    return metrics


# --------------------------------------------------------------------------- command line


@settings_command(PredictConfig, name="predict")
def command(cfg: PredictConfig) -> None:
    """Write label maps of a split with a train-seg checkpoint (multi-scale + flip, optional CRF)."""
    metrics = run(cfg)
    if not dist_info().is_main:
        return
    click.echo(f"{metrics['predicted']} predicted, {metrics['skipped']} skipped -> {cfg.out_dir}")
    if "miou" in metrics:
        click.echo(f"{cfg.split} mIoU {metrics['miou']:.4f}")
