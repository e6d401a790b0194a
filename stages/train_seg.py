"""``wsss train-seg``: train DeepLab on pseudo-labels (or on ground truth for the upper bound).

Recipe: random rescale (0.5-1.5), horizontal flip and ``crop_size`` crops
(padding is ignored), SGD with momentum and the poly schedule, the head at
``head_lr_mult`` times the backbone learning rate, cross-entropy that ignores
255 and, with ``--reliability``/``--raw``, weights every pixel by refine's
reliability map (RAW; the loss is defined in :mod:`wsss.segmentation`).

Every ``eval_every`` iterations and at the end the model is evaluated on the
validation split at full resolution (single scale, no flip, each process its
share of the images; ``wsss predict`` does the multi-scale evaluation),
``last.pth`` is written, and ``best.pth`` follows ``--select``: the last
checkpoint (default; choosing by validation mIoU uses the val masks, i.e.
ground truth, so it is only done when asked with ``--select val-miou``).

The loop, checkpoints, resume and mixed precision are the shared engine's
(:mod:`wsss.training`): a run stopped (``--stop-at`` or killed after a
checkpoint) and resumed from ``last.pth`` follows the same schedule as an
uninterrupted one.

weak/full: ``--upper-bound DIR`` names the output folder of a ``--labels gt``
run of the same model; metrics.json then records
``weak_full_ratio = val_miou / val_miou(upper bound)`` (both the mIoU after
the last iteration).  No sibling folder is searched automatically.  If the gt
run has not finished yet the ratio is left empty (with a warning); running the
same command again once it has finished only fills in the ratio.

Defaults follow common PyTorch DeepLabV3 recipes for an ImageNet backbone with
trainable BatchNorm (crop 321, batch 10, 20k iterations, backbone lr 0.001
and head lr 0.01, weight decay 1e-4, poly 0.9).  The caffe-era lr 2.5e-4 of
the WSSS papers belongs to DeepLab-v2 with frozen BatchNorm; the CPU demo,
trained from scratch, uses lr 0.05 for the whole network (bench/README.md).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from wsss.stages import options
from wsss import artifacts
from wsss.datasets.prepared import PreparedDataset
from wsss.datasets.torch_data import SegmentationDataset
from wsss.device import DistInfo, default_workers, dist_info, seed_everything, shard, sum_array_over_ranks
from wsss.errors import WsssError, non_finite_field, option_name
from wsss.inference import split_batches, to_model_input
from wsss.metrics import ConfusionMatrix, confusion_counts
from wsss.models.deeplab import SEG_MODELS, build_seg_model
from wsss.optim import poly_scheduler, sgd_with_head
from wsss.segmentation import segment_batch, segmentation_loss
from wsss.training import (Loop, Precision, RunSpec, Trainee, TrainState, find_resumable, finished_metrics, fit,
                           grad_scaler, maybe_compile, start_runtime, step_loader, wrap_distributed)
from wsss.transforms import train_preset

log = logging.getLogger(__name__)

GT_LABELS = "gt"
# Options that define the optimisation; a checkpoint can only be resumed when they agree.
SCHEDULE_FIELDS = ("labels", "reliability_dir", "split", "model", "output_stride", "crop_size", "scale_range", "jitter",
                   "batch_size", "lr", "head_lr_mult", "weight_decay", "momentum", "poly_power", "freeze_bn", "seed",
                   "amp")
SELECT_METRICS = {"last": None, "val-miou": "val_miou"}


@dataclass(frozen=True)
class TrainSegConfig:
    """Options of ``wsss train-seg`` (see ``wsss train-seg --help``)."""

    root: Path
    out_dir: Path
    labels: str = GT_LABELS  # "gt" or a folder of pseudo-label PNGs
    reliability_dir: Path | None = None
    dataset: str | None = None
    split: str = "train"
    val_split: str | None = "val"
    model: str = "deeplabv3_resnet50"
    output_stride: int | None = None  # None = the model's own (8 for ResNet-50/101, 16 for ResNet-18)
    weights_backbone: str = "imagenet"
    crop_size: int = 321
    scale_range: tuple[float, float] = (0.5, 1.5)
    jitter: bool = False
    batch_size: int = 10
    iterations: int | None = 20000
    epochs: float | None = None
    stop_at: int | None = None
    lr: float = 0.001
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    momentum: float = 0.9
    poly_power: float = 0.9
    freeze_bn: bool = False
    eval_every: int = 2000
    log_every: int = 50
    select: str = "last"
    upper_bound: Path | None = None
    amp: str = "auto"
    compile_model: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int | None = None
    threads: int | None = None
    overwrite: bool = False


def total_iterations(cfg: TrainSegConfig, num_images: int, world_size: int) -> int:
    """``--iterations``, or ``--epochs`` converted with this rank's share of the images."""
    if cfg.epochs is not None:
        per_rank = math.ceil(num_images / world_size)
        return max(1, math.ceil(cfg.epochs * per_rank / cfg.batch_size))
    return int(cfg.iterations)


def _check_label_folder(folder: Path, ids: list[str], what: str, path_of, hint: str) -> None:
    if not folder.is_dir():
        raise WsssError(f"{folder}: {what} folder not found ({hint})")
    missing = [image_id for image_id in ids if not path_of(folder, image_id).is_file()]
    if missing:
        raise WsssError(f"{path_of(folder, missing[0])}: {what} not found ({len(missing)} of {len(ids)} "
                        f"training images have none; {hint})")


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset: PreparedDataset, split: str, device: torch.device,
                   info: DistInfo, precision: Precision = Precision(), workers: int = 0,
                   batch_size: int = 4) -> ConfusionMatrix:
    """Confusion matrix of single-scale full-resolution predictions on ``split``, summed over ranks.

    Each process predicts its share of the images; counts stay on the device until the one sum.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64, device=device)
    for _, images, masks in split_batches(dataset, split, shard(dataset.ids(split), info), batch_size=batch_size,
                                          workers=workers, device=device, masks=True):
        probs = segment_batch(model, to_model_input(images), scales=(1.0,), flip=False, precision=precision)
        counts += confusion_counts(masks, probs.argmax(1), dataset.num_classes)
    model.train(was_training)
    return ConfusionMatrix(dataset.num_classes).add_counts(sum_array_over_ranks(counts.cpu().numpy(), info, device))


# --------------------------------------------------------------------------- weak / full


def upper_bound_miou(folder: Path) -> float | None:
    """Final validation mIoU of a ``--labels gt`` run, or None while it has not finished.

    Raises:
        WsssError: the folder holds a run that did not train on ground truth.
    """
    path = artifacts.metrics_path(folder)
    if not path.is_file():
        return None
    metrics = artifacts.read_json(path, expect=dict)
    if metrics.get("labels") != GT_LABELS:
        raise WsssError(f"{path}: --upper-bound must be a `train-seg --labels gt` run "
                        f"(this one trained on {metrics.get('labels')!r})")
    value = metrics.get("val_miou")
    if not metrics.get("finished", False) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _add_ratio(metrics: dict, cfg: TrainSegConfig) -> dict:
    """Add ``upper_bound`` and ``weak_full_ratio`` (None, with a warning, while the gt run is unfinished)."""
    if cfg.upper_bound is None:
        return metrics
    full = upper_bound_miou(cfg.upper_bound)
    weak = metrics.get("val_miou")
    metrics["upper_bound"] = {"dir": str(cfg.upper_bound), "val_miou": full}
    metrics["weak_full_ratio"] = weak / full if isinstance(weak, float) and full else None
    if full is None:
        log.warning("%s: no finished --labels gt run with a val mIoU there yet; weak/full not computed "
                    "(run this command again when it has finished)", artifacts.metrics_path(cfg.upper_bound))
    return metrics


# --------------------------------------------------------------------------- training


def _check(cfg: TrainSegConfig, dataset: PreparedDataset) -> Path | None:
    """Validate the options against the dataset; return the pseudo-label folder (None for gt)."""
    if (name := non_finite_field(cfg)) is not None:
        raise WsssError(f"{option_name(name)} {getattr(cfg, name)}: must be a finite number")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise WsssError(f"--epochs {cfg.epochs}: must be positive")
    if cfg.model not in SEG_MODELS:
        raise WsssError(f"--model {cfg.model!r}: choose from {sorted(SEG_MODELS)}")
    if cfg.output_stride is not None and cfg.output_stride not in SEG_MODELS[cfg.model].output_strides:
        strides = " or ".join(map(str, SEG_MODELS[cfg.model].output_strides))
        raise WsssError(f"--output-stride {cfg.output_stride}: {cfg.model} is built with output stride {strides}")
    if cfg.batch_size < 2:
        raise WsssError("--batch-size must be at least 2 (BatchNorm statistics need more than one sample)")
    if (cfg.iterations is None) == (cfg.epochs is None):
        raise WsssError("give exactly one of --iterations and --epochs")
    if cfg.select not in SELECT_METRICS or (SELECT_METRICS[cfg.select] and cfg.val_split is None):
        raise WsssError(f"--select {cfg.select!r}: choose last, or val-miou with a --val-split")
    train_ids = dataset.ids(cfg.split)
    if not train_ids:
        raise WsssError(f"split {cfg.split!r} of {cfg.root} is empty")
    label_dir = None if cfg.labels == GT_LABELS else Path(cfg.labels)
    if label_dir is not None:
        _check_label_folder(label_dir, train_ids, "pseudo-label", artifacts.label_path,
                            "run `wsss refine` first, or pass --labels gt for ground truth")
    if cfg.reliability_dir is not None:
        if label_dir is None:
            raise WsssError("--reliability/--raw weights pseudo-labels; it cannot be combined with --labels gt")
        _check_label_folder(Path(cfg.reliability_dir), train_ids, "reliability map", artifacts.reliability_path,
                            "run `wsss refine` with reliability output")
    if cfg.upper_bound is not None:
        if cfg.val_split is None:
            raise WsssError("--upper-bound compares validation mIoU; it needs a --val-split")
        upper_bound_miou(cfg.upper_bound)  # fail now, not after training, if it is not a gt run
    if cfg.val_split is not None and not dataset.has_masks(cfg.val_split):
        raise WsssError(f"--val-split {cfg.val_split}: split has no ground-truth masks (use --val-split none)")
    return label_dir


def _summary(cfg: TrainSegConfig, state: TrainState, total: int, finished: bool) -> dict:
    validations = [record for record in state.history if record.get("val_miou") is not None]
    best = max(validations, key=lambda record: record["val_miou"], default=None)
    metrics = {
        "labels": cfg.labels if cfg.labels == GT_LABELS else str(cfg.labels),
        "raw": cfg.reliability_dir is not None, "model": cfg.model, "finished": finished,
        "iteration": state.step, "total_iterations": total, "val_split": cfg.val_split,
        "val_miou": validations[-1]["val_miou"] if finished and validations and
        validations[-1]["step"] == state.step else None,
        "best_val_miou": best["val_miou"] if best else None, "best_iteration": best["step"] if best else None,
        "selected": state.best, "seconds": round(state.seconds, 2), "history": state.history,
    }
    if finished and state.extra.get("val_summary") is not None:
        metrics["val"] = state.extra["val_summary"]
    return _add_ratio(metrics, cfg) if finished else metrics


def run(cfg: TrainSegConfig) -> dict:
    """Train (or resume) a segmentation network and return the metrics written to metrics.json."""
    runtime = start_runtime(cfg.device, cfg.threads, cfg.amp)
    device, info, precision = runtime.device, runtime.info, runtime.precision
    dataset = PreparedDataset.load(cfg.root, cfg.dataset)
    label_dir = _check(cfg, dataset)
    augment = train_preset(crop_size=cfg.crop_size, scale_range=cfg.scale_range, jitter=cfg.jitter)
    train_set = SegmentationDataset(dataset, cfg.split, augment,
                                    label_dir=label_dir, reliability_dir=cfg.reliability_dir)
    total = total_iterations(cfg, len(train_set), info.world_size)
    stride = cfg.output_stride or SEG_MODELS[cfg.model].output_stride
    spec = RunSpec(Path(cfg.out_dir), cfg, SCHEDULE_FIELDS, total, dataset.classes,
                   {"model": cfg.model, "num_classes": dataset.num_classes, "output_stride": stride}, cfg.overwrite)
    checkpoint = find_resumable(spec)
    if (metrics := finished_metrics(spec, checkpoint)) is not None:
        metrics = _add_ratio(metrics, cfg)
        if info.is_main:
            artifacts.write_metrics(spec.out_dir, metrics)
        return metrics
    seed_everything(cfg.seed)
    # a resumed model gets its weights from the checkpoint: no need to fetch ImageNet weights again
    model = build_seg_model(cfg.model, dataset.num_classes, "none" if checkpoint else cfg.weights_backbone, stride)
    model = precision.module((model.freeze_backbone_batchnorm() if cfg.freeze_bn else model).to(device))
    optimizer = sgd_with_head(*model.parameter_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                              momentum=cfg.momentum, head_lr_mult=cfg.head_lr_mult)
    trainee = Trainee(model, optimizer, poly_scheduler(optimizer, total, power=cfg.poly_power),
                      grad_scaler(precision, device))
    state = trainee.restore(checkpoint) if checkpoint else TrainState()
    if info.is_main:
        artifacts.write_config(spec.out_dir, cfg, total_iterations=total, num_train_images=len(train_set),
                               classes=dataset.classes, world_size=info.world_size, device=str(device),
                               precision=precision.name)
    network = maybe_compile(wrap_distributed(model, device, info, sync_batchnorm=True), cfg.compile_model)
    workers = min(default_workers(), 4) if cfg.workers is None else cfg.workers

    def step_loss(batch, step):
        images, target, *weight = (tensor.to(device, non_blocking=True) for tensor in batch)
        return {"total": segmentation_loss(network(precision.images(images)).float(), target, *weight)}

    def validation() -> dict:
        matrix = evaluate_model(model, dataset, cfg.val_split, device, info, precision, workers)
        state.extra["val_summary"] = matrix.summary(dataset.classes)
        return {"val_miou": matrix.miou()}

    stop = total if cfg.stop_at is None else min(cfg.stop_at, total)
    loop = Loop(step_loss, round_steps=cfg.eval_every or total, log_every=cfg.log_every,
                summarize=lambda s, done: _summary(cfg, s, total, done), stop_at=stop, desc="train-seg", seed=cfg.seed,
                validate=validation if cfg.val_split else None, select=SELECT_METRICS[cfg.select])
    loader = step_loader(train_set, cfg.batch_size, cfg.seed, info, state.step, stop, workers, device)
    state = fit(trainee, loader, loop, spec, state, precision=precision, device=device, info=info)
    return _summary(cfg, state, total, state.step >= total)


# --------------------------------------------------------------------------- command line


@click.command(short_help="Train DeepLab on pseudo-labels (or ground truth).")
@options.root_option()
@options.dataset_option()
@options.split_option("train", "Training split (use train_aug for the VOC protocol).")
@click.option("--val-split", default="val", show_default=True,
              help="Split with ground truth for validation mIoU; 'none' disables validation.")
@click.option("--labels", required=True,
              help="Folder of pseudo-label PNGs from `wsss refine`, or 'gt' for the ground-truth upper bound.")
@click.option("--reliability", "reliability_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of reliability maps (<id>.npy) that weight the per-pixel loss (RAW).")
@click.option("--raw", is_flag=True, help="RAW weighting with the reliability maps stored beside the pseudo-labels "
                                          "(same as --reliability LABELS).")
@options.out_option("Output folder for last.pth, best.pth, config.json and metrics.json.")
@click.option("--model", type=click.Choice(sorted(SEG_MODELS)), default="deeplabv3_resnet50", show_default=True)
@click.option("--output-stride", type=click.Choice(["8", "16"]), default=None, callback=lambda _c, _p, v: v and int(v),
              help="Input pixels per logit cell: 8 (dense, about 2.5x the compute) or 16 [default: the model's own, "
                   "8 for ResNet-50/101, 16 for ResNet-18].")
@click.option("--weights-backbone", "--weights", "weights_backbone", default="imagenet", show_default=True,
              help="Backbone initialisation: imagenet, none or a state_dict file (e.g. `wsss pretrain`'s "
                   "backbone.pth).")
@click.option("--crop-size", type=click.IntRange(min=8), default=321, show_default=True)
@click.option("--scale-range", default="0.5,1.5", show_default=True, callback=options.old_positive_pair,
              help="MIN,MAX random rescale factors.")
@click.option("--jitter/--no-jitter", default=False, show_default=True, help="Colour jitter.")
@click.option("--batch-size", type=click.IntRange(min=2), default=10, show_default=True)
@click.option("--iterations", type=click.IntRange(min=1), default=None, help="Training iterations [default: 20000].")
@click.option("--epochs", type=options.FiniteFloat(min=0, min_open=True), default=None,
              help="Train for this many passes over the split instead of --iterations.")
@click.option("--stop-at", type=click.IntRange(min=1), default=None,
              help="Stop after this iteration (the schedule still spans the whole run); continue with --resume.")
@options.sgd_options(lr=0.001, head="ASPP head")
@click.option("--freeze-bn", is_flag=True, help="Freeze the backbone's BatchNorm (small batches).")
@click.option("--eval-every", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Validate and checkpoint every K iterations (also without a --val-split); 0 = only at the end.")
@click.option("--log-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Record the mean loss every K iterations in metrics.json.")
@click.option("--select", type=click.Choice(sorted(SELECT_METRICS)), default="last", show_default=True,
              help="What best.pth is: the last checkpoint, or the best val mIoU (uses the val masks: ground truth).")
@click.option("--upper-bound", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder of a finished --labels gt run; metrics.json then records weak/full.")
@options.amp_option
@options.compile_option
@options.device_option
@options.seed_option
@options.workers_option
@options.threads_option
@options.overwrite_option
def command(root, dataset, split, val_split, labels, reliability_dir, raw, out_dir, model, output_stride,
            weights_backbone, crop_size, scale_range, jitter, batch_size, iterations, epochs, stop_at, lr, head_lr_mult,
            weight_decay, momentum, poly_power, freeze_bn, eval_every, log_every, select, upper_bound, amp, compile_model,
            device, seed, workers, threads, overwrite):
    """Train a DeepLabV3 segmentation network on pseudo-labels (--labels DIR) or ground truth (--labels gt)."""
    if raw:
        if reliability_dir is not None:
            raise click.UsageError("give either --raw or --reliability, not both")
        if labels == GT_LABELS:
            raise click.UsageError("--raw needs --labels DIR (the pseudo-label folder holding the reliability maps)")
        reliability_dir = Path(labels)
    if iterations is not None and epochs is not None:
        raise click.UsageError("give either --iterations or --epochs, not both")
    if iterations is None and epochs is None:
        iterations = 20000
    cfg = TrainSegConfig(
        root=root, out_dir=out_dir, labels=labels, reliability_dir=reliability_dir, dataset=dataset, split=split,
        val_split=None if val_split.lower() == "none" else val_split, model=model, output_stride=output_stride,
        weights_backbone=weights_backbone,
        crop_size=crop_size, scale_range=scale_range, jitter=jitter, batch_size=batch_size, iterations=iterations,
        epochs=epochs, stop_at=stop_at, lr=lr, head_lr_mult=head_lr_mult, weight_decay=weight_decay, momentum=momentum,
        poly_power=poly_power, freeze_bn=freeze_bn, eval_every=eval_every, log_every=log_every, select=select,
        upper_bound=upper_bound, amp=amp, compile_model=compile_model, device=device, seed=seed, workers=workers,
        threads=threads, overwrite=overwrite)
    metrics = run(cfg)
    if metrics.get("val_miou") is not None and dist_info().is_main:
        line = f"{cfg.val_split} mIoU {metrics['val_miou']:.4f}"
        if metrics.get("weak_full_ratio") is not None:
            line += f"  weak/full {metrics['weak_full_ratio']:.3f} (upper bound {metrics['upper_bound']['val_miou']:.4f})"
        click.echo(line)
