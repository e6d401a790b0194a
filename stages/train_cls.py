"""``wsss train-cls``: train the multi-label CAM classifier (stage 1).

Recipe (IRN/SEAM): ResNet backbone with output stride 16, a 1x1 classifier
without bias whose class maps are average-pooled into logits, multi-label soft
margin loss, SGD with momentum, the head at 10x the learning rate and the poly
schedule, stepped once per iteration.  Two optional regularisers
(:class:`wsss.losses.CamObjective`):

* ``--er-weight W``: SEAM's equivariance loss between the CAMs of a randomly
  rescaled (``--er-scale-range``) and flipped view and the equally transformed CAMs;
  ``--er-min-crop C < 1`` also cuts the view from a random window (a translation);
* ``--erase-weight W --erase-thresh T``: the regions where a present class's CAM
  reaches ``T`` times its maximum are erased and the erased images must still be
  classified.

After every epoch: the multi-label mAP on ``--val-split`` and, where that split
has masks, the single-scale CAM mIoU on its first ``--val-cam-images`` images at
the background threshold ``--val-cam-threshold``; ``last.pth`` is written and
``best.pth`` keeps the best CAM mIoU (the best mAP without masks; the last epoch
without a validation split).

Resuming: the data order of epoch ``e`` depends only on ``(seed, e)`` and every
image's augmentation and every iteration's random view only on ``(seed, epoch,
image)`` / ``(seed, rank, step)``, so a run resumed from ``last.pth`` (the
default when it exists; ``--overwrite`` starts again) ends with the same weights
as an uninterrupted one on the same device.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from stages import options
from wsss import artifacts
from wsss.cam import max_normalize, multiscale_cam
from wsss.datasets.prepared import PreparedDataset
from wsss.datasets.torch_data import ClassificationDataset, SeededItems
from wsss.device import (default_workers, derive_seed, dist_info, init_distributed, mean_over_ranks,
                         resolve_device, seed_everything)
from wsss.errors import WsssError
from wsss.losses import CamObjective
from wsss.metrics import ConfusionMatrix, average_precision, mean_average_precision
from wsss.models.classifier import ARCHS, CamNet
from wsss.optim import poly_scheduler, sgd_with_head
from wsss.progress import bar as progress_bar
from wsss.transforms import normalize_image, train_preset

log = logging.getLogger(__name__)

# Options that define the optimisation; a checkpoint can only be resumed when they agree.
SCHEDULE_FIELDS = ("split", "backbone", "output_stride", "freeze_bn", "crop_size", "scale_range", "jitter",
                   "batch_size", "epochs", "lr", "head_lr_mult", "weight_decay", "momentum", "poly_power",
                   "er_weight", "er_scale_range", "er_min_crop", "erase_weight", "erase_thresh", "seed")


@dataclass(frozen=True)
class TrainClsConfig:
    """Options of ``wsss train-cls`` (see ``wsss train-cls --help``); defaults follow IRN/SEAM."""

    root: Path
    out_dir: Path
    dataset: str | None = None
    split: str = "train"
    val_split: str | None = "val"
    backbone: str = "resnet50"
    weights: str = "imagenet"
    output_stride: int = 16
    freeze_bn: bool = False
    crop_size: int = 512
    scale_range: tuple[float, float] = (0.5, 1.5)
    jitter: bool = True
    batch_size: int = 16
    epochs: int = 5
    stop_after: int | None = None
    lr: float = 0.1
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    momentum: float = 0.9
    poly_power: float = 0.9
    er_weight: float = 0.0
    er_scale_range: tuple[float, float] = (0.3, 0.7)
    er_min_crop: float = 1.0
    erase_weight: float = 0.0
    erase_thresh: float = 0.7
    val_cam_images: int = 100
    val_cam_threshold: float = 0.15
    device: str = "auto"
    seed: int = 0
    workers: int | None = None
    overwrite: bool = False


def _plain(config: TrainClsConfig) -> dict:
    """The config as JSON types only (checkpoints are loaded with ``weights_only=True``)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


# --------------------------------------------------------------------------- data


class _SeededSampler(DistributedSampler):
    """This rank's share of the epoch's permutation, as ``(index, augmentation seed)`` pairs."""

    def __iter__(self):
        for index in super().__iter__():
            yield index, derive_seed(self.seed, self.epoch, index)


def _worker_init(worker_id: int) -> None:
    # torch seeds `random` and torch per worker; numpy follows from the same base seed.
    np.random.seed(torch.initial_seed() % 2**32)


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model: CamNet, dataset: PreparedDataset, split: str, device: torch.device, cam_images: int,
             cam_threshold: float, show_progress: bool = True) -> dict:
    """Multi-label mAP on a split and, if it has masks, single-scale CAM mIoU on its first images.

    Returns:
        ``{"val_map", "val_ap" (per class name), "val_cam_miou" (None without masks)}``.
    """
    from wsss.evaluation import cam_to_label

    model.eval()
    ids = dataset.ids(split)
    with_masks = dataset.has_masks(split)
    matrix = ConfusionMatrix(dataset.num_classes)
    scores, targets = [], []
    for position, image_id in enumerate(progress_bar(ids, desc=f"val {split}", leave=False, show=show_progress)):
        image = dataset.read_image(split, image_id)
        tensor = normalize_image(image)[None].to(device)
        labels = dataset.image_labels(image_id)
        if with_masks and position < cam_images:
            channels = [[label - 1 for label in labels]]
            cams, logits = multiscale_cam(model, tensor, channels, scales=(1.0,), flip=False)
            cams = max_normalize(cams[0]).cpu().numpy()
            prediction = cam_to_label(np.asarray(labels, dtype=np.int64), cams, cam_threshold)
            matrix.update(dataset.read_mask(split, image_id, image.shape[:2]), prediction)
        else:
            logits = model(tensor)
        scores.append(logits[0].float().cpu().numpy())
        targets.append(dataset.multi_hot(image_id))
    ap = average_precision(np.stack(scores), np.stack(targets)) if scores else np.array([])
    names = dataset.classes[1:]
    return {
        "val_map": mean_average_precision(np.stack(scores), np.stack(targets)) if scores else float("nan"),
        "val_ap": {names[k]: round(float(ap[k]), 6) for k in range(len(ap)) if np.isfinite(ap[k])},
        "val_cam_miou": matrix.miou() if with_masks and cam_images > 0 else None,
    }


# --------------------------------------------------------------------------- training


def _check_resumable(checkpoint: dict, cfg: TrainClsConfig, path: Path) -> None:
    saved, current = checkpoint.get("config", {}), _plain(cfg)
    # an option added after the checkpoint was written counts as its default
    defaults = _plain(TrainClsConfig(root=Path(), out_dir=Path()))
    changed = [name for name in SCHEDULE_FIELDS if saved.get(name, defaults[name]) != current.get(name)]
    if changed:
        raise WsssError(f"{path}: cannot resume, the run used different {', '.join(changed)}; "
                        "pass --overwrite to start again")


def _selection_metric(record: dict) -> tuple[str, float | None]:
    for key in ("val_cam_miou", "val_map"):
        value = record.get(key)
        if value is not None and value == value:
            return key, value
    return "epoch", None


def _summary(state: dict, cfg: TrainClsConfig, finished: bool) -> dict:
    return {"finished": finished, "epoch": state["epoch"], "epochs": cfg.epochs, "step": state["step"],
            "backbone": cfg.backbone, "er_weight": cfg.er_weight, "erase_weight": cfg.erase_weight,
            "seconds": round(state["seconds"], 2), "best": state["best"], "history": state["history"]}


def run(cfg: TrainClsConfig) -> dict:
    """Train (or resume) the CAM classifier; return the metrics written to ``<out>/metrics.json``."""
    if cfg.backbone not in ARCHS:
        raise WsssError(f"--backbone {cfg.backbone!r}: choose from {sorted(ARCHS)}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.crop_size < 16:
        raise WsssError(f"--epochs, --batch-size must be >= 1 and --crop-size >= 16 "
                        f"(got {cfg.epochs}, {cfg.batch_size}, {cfg.crop_size})")
    if not 0 < cfg.erase_thresh <= 1:
        raise WsssError(f"--erase-thresh {cfg.erase_thresh}: must lie in (0, 1]")
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    dataset = PreparedDataset.load(cfg.root, cfg.dataset)
    train_ids = dataset.ids(cfg.split)
    if not train_ids:
        raise WsssError(f"split {cfg.split!r} of {cfg.root} is empty")
    for image_id in train_ids:
        dataset.image_labels(image_id)  # every training image needs labels: fail now, naming the file
    val_split = cfg.val_split
    if val_split is not None and val_split not in dataset.splits:
        log.warning("%s: no split %r; training without validation", dataset.root, val_split)
        val_split = None

    out_dir = Path(cfg.out_dir)
    last_file = artifacts.checkpoint_path(out_dir, "last")
    checkpoint = None
    if last_file.is_file() and not cfg.overwrite:
        checkpoint = artifacts.load_checkpoint(last_file)
        _check_resumable(checkpoint, cfg, last_file)
        if checkpoint.get("epoch", 0) >= cfg.epochs and artifacts.metrics_path(out_dir).is_file():
            log.info("%s: training already finished (%d epochs); pass --overwrite to train again", last_file,
                     cfg.epochs)
            return artifacts.read_json(artifacts.metrics_path(out_dir))

    seed_everything(cfg.seed)
    # A resumed model takes its weights from the checkpoint: no need to fetch ImageNet weights.
    model = CamNet(cfg.backbone, dataset.num_classes, "none" if checkpoint else cfg.weights, cfg.output_stride,
                   freeze_bn=cfg.freeze_bn).to(device)
    optimizer = sgd_with_head(*model.parameter_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                              momentum=cfg.momentum, head_lr_mult=cfg.head_lr_mult)
    train_set = ClassificationDataset(dataset, cfg.split, train_preset(crop_size=cfg.crop_size,
                                                                       scale_range=cfg.scale_range, jitter=cfg.jitter))
    sampler = _SeededSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed)
    if len(sampler) < 2 and not cfg.freeze_bn:
        raise WsssError(f"split {cfg.split!r} has {len(sampler)} image(s) per process; BatchNorm needs at least 2 "
                        "(or pass --freeze-bn)")
    batch_size = min(cfg.batch_size, len(sampler))
    workers = min(default_workers(), 4) if cfg.workers is None else cfg.workers
    generator = torch.Generator()
    generator.manual_seed(cfg.seed)
    loader = DataLoader(SeededItems(train_set), batch_size=batch_size, sampler=sampler, num_workers=workers,
                        drop_last=True, worker_init_fn=_worker_init, generator=generator,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    steps_per_epoch = len(loader)
    scheduler = poly_scheduler(optimizer, cfg.epochs * steps_per_epoch, power=cfg.poly_power)
    state = {"epoch": 0, "step": 0, "history": [], "best": None, "seconds": 0.0}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state.update({key: checkpoint[key] for key in state if key in checkpoint})
        log.info("resuming %s after epoch %d of %d", last_file, state["epoch"], cfg.epochs)

    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        artifacts.write_config(out_dir, cfg, arch=model.arch, classes=dataset.classes, num_train_images=len(train_ids),
                               steps_per_epoch=steps_per_epoch, world_size=info.world_size, device=str(device))

    objective = CamObjective(model, er_weight=cfg.er_weight, er_scale_range=cfg.er_scale_range,
                             er_min_crop=cfg.er_min_crop, erase_weight=cfg.erase_weight, erase_thresh=cfg.erase_thresh)
    train_objective = objective
    if info.distributed:
        # DDP wraps the whole objective so that its several network passes form one DDP forward.
        train_objective = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)

    def save(which: str) -> None:
        artifacts.save_checkpoint(artifacts.checkpoint_path(out_dir, which), {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": state["epoch"], "step": state["step"], "config": _plain(cfg), "classes": list(dataset.classes),
            "arch": model.arch, "history": state["history"], "best": state["best"], "seconds": state["seconds"],
        })

    started = time.perf_counter() - state["seconds"]
    last_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
    for epoch in range(state["epoch"], last_epoch):
        sampler.set_epoch(epoch)
        model.train()
        sums = {"total": 0.0, "cls": 0.0, "er": 0.0, "erase": 0.0}
        progress = progress_bar(loader, desc=f"train-cls {epoch + 1}/{cfg.epochs}", unit="batch", show=info.is_main,
                                leave=False)
        for images, targets in progress:
            state["step"] += 1
            # the random view of the equivariance loss: per step, so a resumed run draws the same ones
            objective.rng.seed(derive_seed(cfg.seed, info.rank, state["step"]))
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            terms = train_objective(images, targets)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            scheduler.step()
            for key in sums:
                sums[key] += float(terms[key].detach())
            progress.set_postfix(loss=f"{float(terms['total'].detach()):.4f}",
                                 lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        progress.close()
        means = mean_over_ranks([value / max(1, steps_per_epoch) for value in sums.values()], info, device)
        record = {"epoch": epoch + 1, "step": state["step"], "lr": optimizer.param_groups[0]["lr"],
                  **{f"loss_{key}": value for key, value in zip(sums, means)}}
        state["epoch"] = epoch + 1
        if info.is_main:
            if val_split is not None:
                record.update(validate(model, dataset, val_split, device, cfg.val_cam_images, cfg.val_cam_threshold))
            state["history"].append(record)
            state["seconds"] = time.perf_counter() - started
            metric, value = _selection_metric(record)
            best = state["best"]
            if best is None or value is None or (best.get("value") is not None and value > best["value"]):
                state["best"] = {"epoch": epoch + 1, "metric": metric, "value": value}
                save("best")
            save("last")
            artifacts.write_metrics(out_dir, _summary(state, cfg, state["epoch"] >= cfg.epochs))
            log.info("epoch %d/%d: loss %.4f (cls %.4f, er %.4f, erase %.4f)%s", epoch + 1, cfg.epochs,
                     record["loss_total"], record["loss_cls"], record["loss_er"], record["loss_erase"],
                     _val_text(record))
        if info.distributed:
            torch.distributed.barrier()
    state["seconds"] = time.perf_counter() - started
    return _summary(state, cfg, state["epoch"] >= cfg.epochs)


def _val_text(record: dict) -> str:
    text = ""
    if record.get("val_map") is not None:
        text += f", val mAP {record['val_map']:.4f}"
    if record.get("val_cam_miou") is not None:
        text += f", val CAM mIoU {record['val_cam_miou']:.4f}"
    return text


# --------------------------------------------------------------------------- command line


@click.command(short_help="Train the multi-label CAM classifier.")
@options.root_option()
@options.dataset_option()
@options.split_option("train", "Training split.")
@click.option("--val-split", default="val", show_default=True,
              help="Split for the per-epoch mAP (and CAM mIoU where it has masks); 'none' disables validation.")
@options.out_option("Output folder for last.pth, best.pth, config.json and metrics.json.")
@click.option("--backbone", type=click.Choice(sorted(ARCHS)), default="resnet50", show_default=True)
@click.option("--weights", default="imagenet", show_default=True,
              help="Backbone initialisation: imagenet (torchvision download), none, or a state_dict file PATH.")
@click.option("--freeze-bn", is_flag=True, help="Keep BatchNorm in eval mode with frozen parameters (small batches).")
@click.option("--crop-size", type=click.IntRange(min=16), default=512, show_default=True)
@click.option("--scale-range", default="0.5,1.5", show_default=True, callback=options.positive_pair,
              help="MIN,MAX random rescale factors before cropping.")
@click.option("--jitter/--no-jitter", default=True, show_default=True, help="Colour jitter.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--stop-after", type=click.IntRange(min=1), default=None,
              help="Stop after this epoch (the schedule still spans --epochs); continue later with --resume.")
@options.sgd_options(lr=0.1, head="Classifier")
@click.option("--er-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of the equivariance regularisation (SEAM); 0 disables it.")
@click.option("--er-scale-range", default="0.3,0.7", show_default=True, callback=options.positive_pair,
              help="MIN,MAX rescale factor of the equivariance view (also flipped at random).")
@click.option("--er-min-crop", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="The equivariance view is a random window of this..1 of each image side (1 = whole image, as "
                   "SEAM); the translation penalises maps anchored to the image frame.")
@click.option("--erase-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of the adversarial-erasing classification loss; 0 disables it.")
@click.option("--erase-thresh", type=click.FloatRange(0, 1, min_open=True), default=0.7, show_default=True,
              help="Erase pixels whose CAM is >= this fraction of the class maximum.")
@click.option("--val-cam-images", type=click.IntRange(min=0), default=100, show_default=True,
              help="Validation images (first N of --val-split) scored for CAM mIoU each epoch.")
@click.option("--val-cam-threshold", type=click.FloatRange(0, 1), default=0.15, show_default=True,
              help="Background threshold of the per-epoch CAM mIoU.")
@options.device_option
@options.seed_option
@options.workers_option
@options.overwrite_option
def command(root, dataset, split, val_split, out_dir, backbone, weights, freeze_bn, crop_size, scale_range, jitter,
            batch_size, epochs, stop_after, lr, head_lr_mult, weight_decay, momentum, poly_power, er_weight,
            er_scale_range, er_min_crop, erase_weight, erase_thresh, val_cam_images, val_cam_threshold, device, seed,
            workers, overwrite):
    """Train a ResNet CAM classifier on image-level labels (equivariance and erasing optional).

    Writes OUT/last.pth, OUT/best.pth, OUT/config.json and OUT/metrics.json; an
    existing OUT/last.pth is resumed unless --overwrite is given.
    """
    cfg = TrainClsConfig(
        root=root, out_dir=out_dir, dataset=dataset, split=split,
        val_split=None if val_split.lower() == "none" else val_split, backbone=backbone, weights=weights,
        freeze_bn=freeze_bn, crop_size=crop_size, scale_range=scale_range, jitter=jitter, batch_size=batch_size,
        epochs=epochs, stop_after=stop_after, lr=lr, head_lr_mult=head_lr_mult, weight_decay=weight_decay,
        momentum=momentum, poly_power=poly_power, er_weight=er_weight, er_scale_range=er_scale_range,
        er_min_crop=er_min_crop, erase_weight=erase_weight, erase_thresh=erase_thresh, val_cam_images=val_cam_images,
        val_cam_threshold=val_cam_threshold, device=device, seed=seed, workers=workers, overwrite=overwrite)
    metrics = run(cfg)
    if not dist_info().is_main:
        return
    best = metrics.get("best") or {}
    line = f"trained {metrics['epoch']}/{cfg.epochs} epochs"
    if best.get("value") is not None:
        line += f"; best {best['metric']} {best['value']:.4f} (epoch {best['epoch']})"
    click.echo(line)
