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
(:mod:`wsss.training`): a run stopped (``--stop-after`` or killed after a
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
from typing import TYPE_CHECKING

import click

from wsss.stages.options import (amp_setting, compile_setting, dataset_setting, device_setting, folder_problem,
                                 loader_workers_setting, overwrite_setting, pair_problem, positive_pair, root_setting,
                                 seed_setting, settings_command, threads_setting)
from wsss import artifacts
from wsss.datasets.prepared import PreparedDataset
from wsss.device import default_workers, dist_info, seed_everything
from wsss.errors import WsssError
from wsss.models import SEG_MODELS
from wsss.optim import Sgd, sgd_group
from wsss.settings import Settings, fail, setting

if TYPE_CHECKING:
    from wsss.training import TrainState

log = logging.getLogger(__name__)

GT_LABELS = "gt"
# The schedule's length when --epochs does not set it (common DeepLabV3 recipes; see the module docstring).
ITERATIONS = 20000
# Options that define the optimisation; a checkpoint can only be resumed when they agree.
SCHEDULE_FIELDS = ("labels", "reliability_dir", "raw", "split", "model", "output_stride", "crop_size", "scale_range",
                   "jitter", "batch_size", "sgd", "freeze_bn", "seed", "amp")
SELECT_METRICS = {"last": None, "val-miou": "val_miou"}


@dataclass(frozen=True)
class TrainSegConfig(Settings):
    """Options of ``wsss train-seg`` (see ``wsss train-seg --help``)."""

    root: Path = root_setting()
    out_dir: Path = setting(help="Output folder for last.pth, best.pth, config.json and metrics.json.", option="--out",
                            validate=folder_problem)
    labels: str = setting(help=f"Folder of pseudo-label PNGs from `wsss refine`, or '{GT_LABELS}' for the "
                               "ground-truth upper bound.", metavar=f"DIR|{GT_LABELS}")
    reliability_dir: Path | None = setting(None, "Folder of reliability maps (<id>.npy) that weight the per-pixel "
                                                 "loss (RAW).", option="--reliability", metavar="DIR")
    raw: bool = setting(False, "RAW weighting with the reliability maps stored beside the pseudo-labels (same as "
                               "--reliability LABELS).", flag="--raw")
    dataset: str | None = dataset_setting()
    split: str = setting("train", "Training split (use train_aug for the VOC protocol).")
    val_split: str | None = setting("val", "Split with ground truth for validation mIoU; none disables validation.")
    model: str = setting("deeplabv3_resnet50", "Segmentation network.", choices=tuple(sorted(SEG_MODELS)))
    output_stride: int | None = setting(None, "Input pixels per logit cell: 8 (dense, about 2.5x the compute) or 16 "
                                              "(none: the model's own, 8 for ResNet-50/101, 16 for ResNet-18).",
                                        choices=tuple(sorted({stride for spec in SEG_MODELS.values()
                                                              for stride in spec.output_strides})))
    weights_backbone: str = setting("imagenet", "Backbone initialisation: imagenet, none or a state_dict file (e.g. "
                                                "`wsss pretrain`'s backbone.pth).", aliases=("--weights",))
    crop_size: int = setting(321, "Side of the square training crop, in pixels.", at_least=8)
    scale_range: tuple[float, float] = setting((0.5, 1.5), "MIN,MAX random rescale factors.", above=0,
                                               parse=positive_pair, validate=pair_problem)
    jitter: bool = setting(False, "Colour jitter.")
    batch_size: int = setting(10, "Images per optimiser step and process (BatchNorm needs at least 2).", at_least=2)
    iterations: int | None = setting(ITERATIONS, "Training iterations (the schedule's length); --epochs replaces "
                                                 "them.", at_least=1)
    epochs: float | None = setting(None, "Train for this many passes over the split instead of --iterations.",
                                   above=0)
    stop_after: int | None = setting(None, "Stop after this many iterations (the schedule still spans --iterations); "
                                           "continue later with --resume.", at_least=1)
    sgd: Sgd = sgd_group(lr=0.001)
    freeze_bn: bool = setting(False, "Freeze the backbone's BatchNorm (small batches).")
    eval_every: int = setting(2000, "Validate and checkpoint every K iterations (also without a --val-split); 0 = "
                                    "only at the end.", at_least=0)
    log_every: int = setting(50, "Record the mean loss every K iterations in metrics.json.", at_least=1)
    select: str = setting("last", "What picks best.pth: the last checkpoint, or the best val mIoU (uses the val masks: "
                                  "ground truth).", choices=tuple(sorted(SELECT_METRICS)))
    upper_bound: Path | None = setting(None, f"Output folder of a finished --labels {GT_LABELS} run; metrics.json "
                                             "then records weak/full.", metavar="DIR")
    amp: str = amp_setting()
    compile_model: bool = compile_setting()
    device: str = device_setting()
    seed: int = seed_setting()
    workers: int | None = loader_workers_setting()
    threads: int | None = threads_setting()
    overwrite: bool = overwrite_setting()

    def check(self) -> None:
        if self.epochs is not None and self.iterations not in (None, ITERATIONS):
            fail("--epochs", f"{self.epochs:g}: give either --iterations or --epochs, not both")
        if self.epochs is None and self.iterations is None:
            fail("--iterations", "none: give --iterations or --epochs")
        strides = SEG_MODELS[self.model].output_strides
        if self.output_stride is not None and self.output_stride not in strides:
            fail("--output-stride", f"{self.output_stride}: {self.model} is built with output stride "
                                    f"{' or '.join(map(str, strides))}")
        if self.raw and self.reliability_dir is not None:
            fail("--raw", "give either --raw or --reliability, not both")
        if self.labels == GT_LABELS and (self.raw or self.reliability_dir is not None):
            option = "--raw" if self.raw else "--reliability"
            fail(option, f"weights pseudo-labels: {option} needs --labels DIR, not --labels {GT_LABELS}")
        if SELECT_METRICS[self.select] and self.val_split is None:
            fail("--select", f"{self.select}: needs a --val-split (or --select last)")
        if self.upper_bound is not None and self.val_split is None:
            fail("--upper-bound", f"{self.upper_bound}: compares validation mIoU; it needs a --val-split")

    @property
    def label_dir(self) -> Path | None:
        """The pseudo-label folder (None: ground truth)."""
        return None if self.labels == GT_LABELS else Path(self.labels)

    @property
    def reliability_folder(self) -> Path | None:
        """The folder of the reliability maps that weight the loss (None: no RAW weighting)."""
        return Path(self.labels) if self.raw else self.reliability_dir


def total_iterations(cfg: TrainSegConfig, num_images: int, world_size: int) -> int:
    """``--iterations``, or ``--epochs`` converted with this rank's share of the images."""
    if cfg.epochs is not None:
        per_rank = math.ceil(num_images / world_size)
        return max(1, math.ceil(cfg.epochs * per_rank / cfg.batch_size))
    return cfg.iterations


def _check_label_folder(folder: Path, ids: list[str], what: str, path_of, hint: str) -> None:
    if not folder.is_dir():
        raise WsssError(f"{folder}: {what} folder not found ({hint})")
    missing = [image_id for image_id in ids if not path_of(folder, image_id).is_file()]
    if missing:
        raise WsssError(f"{path_of(folder, missing[0])}: {what} not found ({len(missing)} of {len(ids)} "
                        f"training images have none; {hint})")


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


def _training_data(cfg: TrainSegConfig) -> PreparedDataset:
    """The prepared dataset, with every training image's (pseudo-)label and reliability map present."""
    dataset = PreparedDataset.load(cfg.root, cfg.dataset)
    train_ids = dataset.ids(cfg.split)
    if not train_ids:
        raise WsssError(f"split {cfg.split!r} of {cfg.root} is empty")
    if cfg.label_dir is not None:
        _check_label_folder(cfg.label_dir, train_ids, "pseudo-label", artifacts.label_path,
                            "run `wsss refine` first, or pass --labels gt for ground truth")
    if cfg.reliability_folder is not None:
        _check_label_folder(cfg.reliability_folder, train_ids, "reliability map", artifacts.reliability_path,
                            "run `wsss refine` with reliability output")
    if cfg.upper_bound is not None:
        upper_bound_miou(cfg.upper_bound)  # fail now, not after training, if it is not a gt run
    if cfg.val_split is not None and not dataset.has_masks(cfg.val_split):
        raise WsssError(f"--val-split {cfg.val_split}: split has no ground-truth masks (use --val-split none)")
    return dataset


def _summary(cfg: TrainSegConfig, state: TrainState, total: int, finished: bool) -> dict:
    validations = [record for record in state.history if record.get("val_miou") is not None]
    best = max(validations, key=lambda record: record["val_miou"], default=None)
    metrics = {
        "labels": cfg.labels if cfg.labels == GT_LABELS else str(cfg.labels),
        "raw": cfg.reliability_folder is not None, "model": cfg.model, "finished": finished,
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
    # the network and torch are imported here, not at the top, so that `wsss train-seg --help` does not load them
    from wsss.datasets.torch_data import SegmentationDataset
    from wsss.models.deeplab import build_seg_model
    from wsss.segmentation import evaluate_model, segmentation_loss
    from wsss.training import (Loop, RunSpec, Trainee, TrainState, find_resumable, finished_metrics, fit,
                               grad_scaler, maybe_compile, start_runtime, step_loader, wrap_distributed)
    from wsss.transforms import train_preset

    runtime = start_runtime(cfg.device, cfg.threads, cfg.amp)
    device, info, precision = runtime.device, runtime.info, runtime.precision
    dataset = _training_data(cfg)
    augment = train_preset(crop_size=cfg.crop_size, scale_range=cfg.scale_range, jitter=cfg.jitter)
    train_set = SegmentationDataset(dataset, cfg.split, augment,
                                    label_dir=cfg.label_dir, reliability_dir=cfg.reliability_folder)
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
    optimizer = cfg.sgd.optimizer(*model.parameter_groups())
    trainee = Trainee(model, optimizer, cfg.sgd.scheduler(optimizer, total), grad_scaler(precision, device))
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

    stop = total if cfg.stop_after is None else min(cfg.stop_after, total)
    loop = Loop(step_loss, round_steps=cfg.eval_every or total, log_every=cfg.log_every,
                summarize=lambda s, done: _summary(cfg, s, total, done), stop_at=stop, desc="train-seg", seed=cfg.seed,
                validate=validation if cfg.val_split else None, select=SELECT_METRICS[cfg.select])
    loader = step_loader(train_set, cfg.batch_size, cfg.seed, info, state.step, stop, workers, device)
    state = fit(trainee, loader, loop, spec, state, precision=precision, device=device, info=info)
    return _summary(cfg, state, total, state.step >= total)


# --------------------------------------------------------------------------- command line


@settings_command(TrainSegConfig, name="train-seg")
def command(cfg: TrainSegConfig) -> None:
    """Train a DeepLabV3 segmentation network on pseudo-labels (--labels DIR) or ground truth (--labels gt)."""
    metrics = run(cfg)
    if metrics.get("val_miou") is not None and dist_info().is_main:
        line = f"{cfg.val_split} mIoU {metrics['val_miou']:.4f}"
        if metrics.get("weak_full_ratio") is not None:
            upper = metrics["upper_bound"]["val_miou"]
            line += f"  weak/full {metrics['weak_full_ratio']:.3f} (upper bound {upper:.4f})"
        click.echo(line)
