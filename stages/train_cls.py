"""``wsss train-cls``: train the multi-label CAM classifier (stage 1).

Recipe (IRN/SEAM): ResNet backbone with output stride 16, a 1x1 classifier
without bias whose class maps are average-pooled into logits (``--pooling lse``:
log-sum-exp instead, see :mod:`wsss.models.classifier`), multi-label soft
margin loss, SGD with momentum, the head at 10x the learning rate and the poly
schedule, stepped once per iteration.  Two optional regularisers, both off by
default because ``bench/ablation.md`` measures no gain from them through DeepLab
(:class:`wsss.losses.CamObjective`):

* ``--er-weight W``: SEAM's equivariance loss between the CAMs of a randomly
  rescaled (``--er-scale-range``) and flipped view and the equally transformed CAMs;
  ``--er-min-crop C < 1`` also cuts the view from a random window (a translation);
* ``--erase-weight W --erase-thresh T``: the regions where a present class's CAM
  reaches ``T`` times its maximum are erased and the erased images must still be
  classified.

After every epoch: the multi-label mAP on ``--val-split`` and, where that split
has masks, the single-scale CAM mIoU on its first ``--val-cam-images`` images at
the background threshold ``--val-cam-threshold`` (both computed by every process
on its share of the split); ``last.pth`` is written and ``best.pth`` keeps the
epoch with the best ``--select`` metric.

The loop, checkpoints, resume and mixed precision are the shared engine's
(:mod:`wsss.training`): a run resumed from ``last.pth`` (the default when it
exists; ``--overwrite`` starts again) ends with the same weights as an
uninterrupted one on the same device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from stages import options
from wsss import artifacts
from wsss.cam import max_normalize, multiscale_cam
from wsss.datasets.prepared import PreparedDataset
from wsss.datasets.torch_data import ClassificationDataset
from wsss.device import DistInfo, default_workers, dist_info, seed_everything, shard, sum_array_over_ranks
from wsss.errors import WsssError, non_finite_field, option_name
from wsss.inference import split_batches, to_model_input
from wsss.losses import ER_TARGETS, ERASE_CLASSES, ERASE_FILLS, CamObjective, regulariser_ramp
from wsss.metrics import ConfusionMatrix, average_precision, confusion_counts, mean_average_precision
from wsss.models.classifier import ARCHS, POOLINGS, CamNet, classifier_arch
from wsss.optim import poly_scheduler, sgd_with_head
from wsss.training import (Loop, Precision, RunSpec, Trainee, TrainState, find_resumable, finished_metrics, fit,
                           grad_scaler, maybe_compile, start_runtime, step_loader, steps_per_epoch, wrap_distributed)
from wsss.transforms import train_preset

log = logging.getLogger(__name__)

# Options that define the optimisation; a checkpoint can only be resumed when they agree.
SCHEDULE_FIELDS = ("split", "backbone", "output_stride", "pooling", "lse_r", "freeze_bn", "crop_size", "scale_range",
                   "jitter", "batch_size", "epochs", "lr", "head_lr_mult", "weight_decay", "momentum", "poly_power",
                   "er_weight", "er_scale_range", "er_min_crop", "er_target", "er_view_cls", "erase_weight",
                   "erase_thresh", "erase_fill", "erase_classes", "reg_start", "reg_ramp", "seed", "amp")
SELECT_METRICS = {"map": "val_map", "cam-miou": "val_cam_miou", "last": None}


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
    pooling: str = "gap"
    lse_r: float = 5.0
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
    er_target: str = "detached"
    er_view_cls: bool = True
    erase_weight: float = 0.0
    erase_thresh: float = 0.7
    erase_fill: str = "blur"
    erase_classes: str = "all"
    reg_start: float = 0.0
    reg_ramp: float = 0.0
    val_cam_images: int = 100
    val_cam_threshold: float = 0.15
    select: str = "map"
    amp: str = "auto"
    compile_model: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int | None = None
    threads: int | None = None
    overwrite: bool = False


def _check(cfg: TrainClsConfig) -> None:
    if (name := non_finite_field(cfg)) is not None:
        raise WsssError(f"{option_name(name)} {getattr(cfg, name)}: must be a finite number")
    if cfg.backbone not in ARCHS:
        raise WsssError(f"--backbone {cfg.backbone!r}: choose from {sorted(ARCHS)}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.crop_size < 16:
        raise WsssError(f"--epochs, --batch-size must be >= 1 and --crop-size >= 16 "
                        f"(got {cfg.epochs}, {cfg.batch_size}, {cfg.crop_size})")
    if not 0 < cfg.erase_thresh <= 1:
        raise WsssError(f"--erase-thresh {cfg.erase_thresh}: must lie in (0, 1]")
    if cfg.select not in SELECT_METRICS:
        raise WsssError(f"--select {cfg.select!r}: choose from {', '.join(SELECT_METRICS)}")


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model: CamNet, dataset: PreparedDataset, split: str, device: torch.device, info: DistInfo, *,
             precision: Precision = Precision(), cam_images: int = 100, cam_threshold: float = 0.15,
             workers: int = 0) -> dict:
    """Multi-label mAP on a split and, if it has masks, single-scale CAM mIoU on its first images.

    Every process scores its share of the images; scores and confusion counts are summed over
    processes, so the result does not depend on how many there are.

    Returns:
        ``{"val_map", "val_ap" (per class name), "val_cam_miou" (None without masks)}``.
    """
    from wsss.evaluation import cam_to_label_tensor

    model.eval()
    ids = dataset.ids(split)
    position = {image_id: index for index, image_id in enumerate(ids)}
    with_masks = dataset.has_masks(split) and cam_images > 0
    scores = np.zeros((len(ids), dataset.num_classes - 1))
    counts = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64, device=device)
    for batch_ids, images, masks in split_batches(dataset, split, shard(ids, info), batch_size=8, workers=workers,
                                                  device=device, masks=with_masks):
        channels = [[label - 1 for label in dataset.image_labels(image_id)] for image_id in batch_ids]
        with precision.autocast(device):
            cams, logits = multiscale_cam(model, to_model_input(images), channels, scales=(1.0,), flip=False)
        for index, image_id in enumerate(batch_ids):
            if with_masks and position[image_id] < cam_images:
                keys = torch.tensor(channels[index], device=device) + 1
                label = cam_to_label_tensor(keys, max_normalize(cams[index]), cam_threshold)
                counts += confusion_counts(masks[index], label, dataset.num_classes)
        scores[[position[image_id] for image_id in batch_ids]] = logits.float().cpu().numpy()
    scores = sum_array_over_ranks(scores, info, device)
    matrix = ConfusionMatrix(dataset.num_classes).add_counts(sum_array_over_ranks(counts.cpu().numpy(), info, device))
    targets = np.stack([dataset.multi_hot(image_id) for image_id in ids]) if ids else np.zeros((0, scores.shape[1]))
    ap = average_precision(scores, targets) if ids else np.array([])
    names = dataset.classes[1:]
    return {
        "val_map": mean_average_precision(scores, targets) if ids else None,
        "val_ap": {names[k]: round(float(ap[k]), 6) for k in range(len(ap)) if np.isfinite(ap[k])},
        "val_cam_miou": matrix.miou() if with_masks else None,
    }


# --------------------------------------------------------------------------- training


def _training_data(cfg: TrainClsConfig) -> tuple[PreparedDataset, str | None]:
    """The prepared dataset (every training image has labels) and the usable validation split."""
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
    return dataset, val_split


def _summary(cfg: TrainClsConfig, state: TrainState, finished: bool) -> dict:
    return {"finished": finished, "epoch": state.round, "epochs": cfg.epochs, "step": state.step,
            "backbone": cfg.backbone, "er_weight": cfg.er_weight, "erase_weight": cfg.erase_weight,
            "seconds": round(state.seconds, 2), "best": state.best, "history": state.history}


def run(cfg: TrainClsConfig) -> dict:
    """Train (or resume) the CAM classifier; return the metrics written to ``<out>/metrics.json``."""
    _check(cfg)
    runtime = start_runtime(cfg.device, cfg.threads, cfg.amp)
    device, info, precision = runtime.device, runtime.info, runtime.precision
    dataset, val_split = _training_data(cfg)
    train_set = ClassificationDataset(dataset, cfg.split, train_preset(crop_size=cfg.crop_size,
                                                                       scale_range=cfg.scale_range, jitter=cfg.jitter))
    batch_size = min(cfg.batch_size, max(1, len(train_set) // info.world_size))
    if batch_size < 2 and not cfg.freeze_bn:
        raise WsssError(f"split {cfg.split!r} has {len(train_set)} image(s) per process; BatchNorm needs at "
                        "least 2 (or pass --freeze-bn)")
    per_epoch = steps_per_epoch(len(train_set), batch_size, info.world_size)
    arch = classifier_arch(cfg.backbone, dataset.num_classes, cfg.output_stride, cfg.pooling, cfg.lse_r)
    # --lse-r only shapes an lse run: a mean-pooled run resumes whatever it says
    fields = SCHEDULE_FIELDS if cfg.pooling == "lse" else tuple(f for f in SCHEDULE_FIELDS if f != "lse_r")
    spec = RunSpec(Path(cfg.out_dir), cfg, fields, cfg.epochs * per_epoch, dataset.classes, arch, cfg.overwrite)
    checkpoint = find_resumable(spec)
    if (metrics := finished_metrics(spec, checkpoint)) is not None:
        return metrics
    seed_everything(cfg.seed)
    # a resumed model takes its weights from the checkpoint: no need to fetch ImageNet weights
    model = precision.module(CamNet(cfg.backbone, dataset.num_classes, "none" if checkpoint else cfg.weights,
                                    cfg.output_stride, freeze_bn=cfg.freeze_bn, pooling=cfg.pooling,
                                    lse_r=cfg.lse_r).to(device))
    optimizer = sgd_with_head(*model.parameter_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                              momentum=cfg.momentum, head_lr_mult=cfg.head_lr_mult)
    trainee = Trainee(model, optimizer, poly_scheduler(optimizer, spec.total_steps, power=cfg.poly_power),
                      grad_scaler(precision, device))
    state = trainee.restore(checkpoint) if checkpoint else TrainState()
    if info.is_main:
        artifacts.write_config(spec.out_dir, cfg, arch=arch, classes=dataset.classes, num_train_images=len(train_set),
                               steps_per_epoch=per_epoch, world_size=info.world_size, device=str(device),
                               precision=precision.name)
    objective = maybe_compile(wrap_distributed(CamObjective(
        model, er_weight=cfg.er_weight, er_scale_range=cfg.er_scale_range, er_min_crop=cfg.er_min_crop,
        er_target=cfg.er_target, er_view_cls=cfg.er_view_cls, erase_weight=cfg.erase_weight,
        erase_thresh=cfg.erase_thresh, erase_fill=cfg.erase_fill, erase_classes=cfg.erase_classes), device, info),
        cfg.compile_model)
    workers = min(default_workers(), 4) if cfg.workers is None else cfg.workers

    def step_loss(batch, step):
        images, targets = (tensor.to(device, non_blocking=True) for tensor in batch)
        ramp = regulariser_ramp(step, spec.total_steps, cfg.reg_start, cfg.reg_ramp)
        return objective(precision.images(images), targets, ramp)

    def validation() -> dict:
        return validate(model, dataset, val_split, device, info, precision=precision, cam_images=cfg.val_cam_images,
                        cam_threshold=cfg.val_cam_threshold, workers=workers)

    stop = spec.total_steps if cfg.stop_after is None else min(spec.total_steps, cfg.stop_after * per_epoch)
    loop = Loop(step_loss, round_steps=per_epoch, summarize=lambda s, done: _summary(cfg, s, done),
                validate=validation if val_split else None, select=SELECT_METRICS[cfg.select], stop_at=stop,
                desc="train-cls", seed=cfg.seed)
    loader = step_loader(train_set, batch_size, cfg.seed, info, state.step, stop, workers, device)
    state = fit(trainee, loader, loop, spec, state, precision=precision, device=device, info=info)
    return _summary(cfg, state, state.step >= spec.total_steps)


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
              help="Backbone initialisation: imagenet (torchvision download), none, or a state_dict file PATH "
                   "(e.g. `wsss pretrain`'s backbone.pth).")
@click.option("--output-stride", type=click.Choice(["8", "16", "32"]), default="16", show_default=True,
              callback=lambda _c, _p, v: int(v),
              help="Input pixels per CAM cell: 16 dilates the last stage (IRN), 8 the last two (SEAM's ResNet-38 "
                   "setting: 4x the cells, about 3x the compute).")
@click.option("--pooling", type=click.Choice(POOLINGS), default="gap", show_default=True,
              help="How class maps become logits: gap, their mean (CAM, IRN, SEAM); lse, log-sum-exp (Pinheiro & "
                   "Collobert) with sharpness --lse-r, between the mean and the maximum.")
@click.option("--lse-r", type=options.FiniteFloat(min=0.1), default=5.0, show_default=True,
              help="Sharpness r of --pooling lse: (1/r) log mean exp(r x); small r is the mean, large r the maximum "
                   "(at least 0.1: below, rounding swamps the difference to the mean).")
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
@click.option("--er-weight", type=options.FiniteFloat(min=0), default=0.0, show_default=True,
              help="Weight of the equivariance regularisation (SEAM; its paper uses 1); 0 disables it.  Off by "
                   "default: bench/ablation.md measures that it raises the CAMs but not the pseudo-labels or DeepLab.")
@click.option("--er-scale-range", default="0.3,0.7", show_default=True, callback=options.positive_pair,
              help="MIN,MAX rescale factor of the equivariance view (also flipped at random).")
@click.option("--er-min-crop", type=options.FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True,
              help="The equivariance view is a random window of this..1 of each image side (1 = whole image, as "
                   "SEAM); the translation penalises maps anchored to the image frame.")
@click.option("--er-target", type=click.Choice(ER_TARGETS), default="detached", show_default=True,
              help="detached: the image's CAMs are the target of the view's (no gradient into them); both: "
                   "the gradient reaches both branches (SEAM).")
@click.option("--er-view-cls/--no-er-view-cls", default=True, show_default=True,
              help="Also classify the equivariance view (SEAM classifies both branches).")
@click.option("--erase-weight", type=options.FiniteFloat(min=0), default=0.0, show_default=True,
              help="Weight of the adversarial-erasing classification loss; 0 disables it.")
@click.option("--erase-thresh", type=options.FiniteFloat(0, 1, min_open=True), default=0.7, show_default=True,
              help="Erase pixels whose CAM is >= this fraction of the class maximum.")
@click.option("--erase-fill", type=click.Choice(ERASE_FILLS), default="blur", show_default=True,
              help="What replaces erased pixels: a blurred copy of the image (no sharp flat patch to learn as a "
                   "cue) or the mean colour.")
@click.option("--erase-classes", type=click.Choice(ERASE_CLASSES), default="all", show_default=True,
              help="Erase the regions of every present class, or of one random present class per image.")
@click.option("--reg-start", type=options.FiniteFloat(0, 1), default=0.0, show_default=True,
              help="Fraction of the schedule before equivariance and erasing start (the classifier learns first).")
@click.option("--reg-ramp", type=options.FiniteFloat(0, 1), default=0.0, show_default=True,
              help="Fraction of the schedule over which they then rise linearly to full weight.")
@click.option("--val-cam-images", type=click.IntRange(min=0), default=100, show_default=True,
              help="Validation images (first N of --val-split) scored for CAM mIoU each epoch.")
@click.option("--val-cam-threshold", type=options.FiniteFloat(0, 1), default=0.15, show_default=True,
              help="Background threshold of the per-epoch CAM mIoU.")
@click.option("--select", type=click.Choice(sorted(SELECT_METRICS)), default="map", show_default=True,
              help="What picks best.pth: val mAP (image-level labels only), val CAM mIoU (uses the val masks), "
                   "or the last epoch.")
@options.amp_option
@options.compile_option
@options.device_option
@options.seed_option
@options.workers_option
@options.threads_option
@options.overwrite_option
def command(root, dataset, split, val_split, out_dir, backbone, weights, output_stride, pooling, lse_r, freeze_bn,
            crop_size, scale_range, jitter, batch_size, epochs, stop_after, lr, head_lr_mult, weight_decay, momentum,
            poly_power, er_weight, er_scale_range, er_min_crop, er_target, er_view_cls, erase_weight, erase_thresh,
            erase_fill, erase_classes, reg_start, reg_ramp, val_cam_images, val_cam_threshold, select, amp, compile_model,
            device, seed, workers, threads, overwrite):
    """Train a ResNet CAM classifier on image-level labels (equivariance and erasing optional).

    Writes OUT/last.pth, OUT/best.pth, OUT/config.json and OUT/metrics.json; an
    existing OUT/last.pth is resumed unless --overwrite is given.
    """
    cfg = TrainClsConfig(
        root=root, out_dir=out_dir, dataset=dataset, split=split,
        val_split=None if val_split.lower() == "none" else val_split, backbone=backbone, weights=weights,
        output_stride=output_stride, pooling=pooling, lse_r=lse_r, freeze_bn=freeze_bn, crop_size=crop_size,
        scale_range=scale_range, jitter=jitter, batch_size=batch_size,
        epochs=epochs, stop_after=stop_after, lr=lr, head_lr_mult=head_lr_mult, weight_decay=weight_decay,
        momentum=momentum, poly_power=poly_power, er_weight=er_weight, er_scale_range=er_scale_range,
        er_min_crop=er_min_crop, er_target=er_target, er_view_cls=er_view_cls, erase_weight=erase_weight,
        erase_thresh=erase_thresh, erase_fill=erase_fill, erase_classes=erase_classes, reg_start=reg_start,
        reg_ramp=reg_ramp, val_cam_images=val_cam_images,
        val_cam_threshold=val_cam_threshold, select=select, amp=amp, compile_model=compile_model, device=device,
        seed=seed, workers=workers, threads=threads, overwrite=overwrite)
    metrics = run(cfg)
    if not dist_info().is_main:
        return
    best = metrics.get("best") or {}
    line = f"trained {metrics['epoch']}/{cfg.epochs} epochs"
    if best.get("value") is not None:
        line += f"; best {best['metric']} {best['value']:.4f} (epoch {best['round']})"
    click.echo(line)
