"""``wsss train-seg``: train DeepLab on pseudo-labels (or on ground truth for the upper bound).

Recipe: random rescale (0.5-1.5), horizontal flip and ``crop_size`` crops
(padding is ignored), SGD with momentum and the poly schedule, the head at
``head_lr_mult`` times the backbone learning rate, cross-entropy that ignores
255 and, with ``--reliability``/``--raw``, weights every pixel by refine's
reliability map (RAW; the loss is defined in :mod:`wsss.segmentation`).

Every ``eval_every`` iterations and at the end the model is evaluated on the
validation split at full resolution (single scale, no flip; ``wsss predict``
does the multi-scale evaluation), ``last.pth`` is written and ``best.pth``
keeps the best validation mIoU.

Resuming: the data order and augmentation of iteration ``i`` depend only on
``(seed, rank, i)`` and the random state is re-seeded every iteration, so a
run stopped (``--stop-at`` or killed after a checkpoint) and resumed from
``last.pth`` follows the same schedule as an uninterrupted one.

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

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from stages import options
from wsss import artifacts
from wsss.datasets.prepared import PreparedDataset
from wsss.datasets.torch_data import SeededItems, SegmentationDataset
from wsss.device import (DistInfo, default_workers, derive_seed, dist_info, init_distributed, mean_over_ranks,
                         resolve_device, seed_everything, shard)
from wsss.errors import WsssError
from wsss.metrics import ConfusionMatrix
from wsss.models.backbones import freeze_batchnorm
from wsss.models.deeplab import SEG_MODELS, build_seg_model
from wsss.optim import poly_scheduler, sgd_with_head
from wsss.progress import bar as progress_bar
from wsss.segmentation import predict_probs, segmentation_loss
from wsss.transforms import train_preset

log = logging.getLogger(__name__)

GT_LABELS = "gt"
# Options that define the optimisation; a checkpoint can only be resumed when they agree.
SCHEDULE_FIELDS = ("labels", "reliability_dir", "split", "model", "crop_size", "scale_range", "jitter", "batch_size",
                   "lr", "head_lr_mult", "weight_decay", "momentum", "poly_power", "freeze_bn", "seed")


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
    upper_bound: Path | None = None
    device: str = "auto"
    seed: int = 0
    workers: int | None = None
    overwrite: bool = False


def _plain(config: TrainSegConfig) -> dict:
    """The config as JSON types only (for checkpoints loaded with ``weights_only=True``)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


# --------------------------------------------------------------------------- data


class IterationBatchSampler:
    """Batches for iterations ``start .. total - 1`` drawn from a stream of shuffled epochs.

    Position ``p`` of this rank's stream is item ``p % n`` of epoch ``p // n``,
    where an epoch is this rank's share of a :class:`DistributedSampler`
    permutation (``n`` items; the sampler pads so every rank gets the same
    count).  Iteration ``i`` takes positions ``i*B .. i*B + B - 1``, so batches
    are always full (BatchNorm needs more than one sample) and depend only on
    ``(seed, rank, i)``.  Each entry is ``(dataset index, augmentation seed)``.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, info: DistInfo, start: int, total: int):
        self.sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                          seed=seed, drop_last=False)
        self.batch_size, self.seed, self.rank = batch_size, seed, info.rank
        self.start, self.total = start, total
        self._epoch, self._order = None, []

    def _indices(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, list(self.sampler)
        return self._order

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self):
        per_epoch = len(self.sampler)
        for iteration in range(self.start, self.total):
            batch = []
            for position in range(iteration * self.batch_size, (iteration + 1) * self.batch_size):
                epoch, offset = divmod(position, per_epoch)
                item_seed = derive_seed(self.seed, self.rank, position)
                batch.append((self._indices(epoch)[offset], item_seed))
            yield batch


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


def evaluate_model(model: torch.nn.Module, dataset: PreparedDataset, split: str, device: torch.device,
                   info: DistInfo, show_progress: bool = True) -> ConfusionMatrix:
    """Confusion matrix of single-scale full-resolution predictions on ``split``, summed over ranks."""
    matrix = ConfusionMatrix(dataset.num_classes)
    for image_id in progress_bar(shard(dataset.ids(split), info), desc=f"eval {split}", leave=False,
                                 show=show_progress and info.is_main):
        image = dataset.read_image(split, image_id)
        mask = dataset.read_mask(split, image_id, image.shape[:2])
        probs = predict_probs(model, image, scales=(1.0,), flip=False, device=device)
        matrix.update(mask, probs.argmax(0))
    if info.distributed:
        import torch.distributed as dist

        counts = torch.from_numpy(matrix.matrix).to(device)
        dist.all_reduce(counts)
        matrix.matrix = counts.cpu().numpy()
    return matrix


# --------------------------------------------------------------------------- weak / full


def upper_bound_miou(folder: Path) -> float | None:
    """Final validation mIoU of a ``--labels gt`` run, or None while it has not finished.

    Raises:
        WsssError: the folder holds a run that did not train on ground truth.
    """
    path = artifacts.metrics_path(folder)
    if not path.is_file():
        return None
    metrics = artifacts.read_json(path)
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


def _check_resumable(checkpoint: dict, cfg: TrainSegConfig, total: int, path: Path) -> None:
    saved = checkpoint.get("config", {})
    current = _plain(cfg)
    changed = [name for name in SCHEDULE_FIELDS if saved.get(name) != current.get(name)]
    if checkpoint.get("total_iterations") != total:
        changed.append(f"total iterations ({checkpoint.get('total_iterations')} -> {total})")
    if changed:
        raise WsssError(f"{path}: cannot resume, the run used different {', '.join(changed)}; "
                        "pass --overwrite to start again")


def run(cfg: TrainSegConfig) -> dict:
    """Train (or resume) a segmentation network and return the metrics written to metrics.json."""
    if cfg.model not in SEG_MODELS:
        raise WsssError(f"--model {cfg.model!r}: choose from {sorted(SEG_MODELS)}")
    if cfg.batch_size < 2:
        raise WsssError("--batch-size must be at least 2 (BatchNorm statistics need more than one sample)")
    if (cfg.iterations is None) == (cfg.epochs is None):
        raise WsssError("give exactly one of --iterations and --epochs")
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    dataset = PreparedDataset.load(cfg.root, cfg.dataset)
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
    train_set = SegmentationDataset(dataset, cfg.split, train_preset(crop_size=cfg.crop_size, scale_range=cfg.scale_range,
                                                                     jitter=cfg.jitter),
                                    label_dir=label_dir, reliability_dir=cfg.reliability_dir)
    total = total_iterations(cfg, len(train_ids), info.world_size)
    stop = total if cfg.stop_at is None else min(cfg.stop_at, total)
    out_dir = Path(cfg.out_dir)
    last_file = artifacts.checkpoint_path(out_dir, "last")

    checkpoint = None
    if last_file.is_file() and not cfg.overwrite:
        checkpoint = artifacts.load_checkpoint(last_file)
        _check_resumable(checkpoint, cfg, total, last_file)
        if checkpoint.get("iteration", 0) >= total and artifacts.metrics_path(out_dir).is_file():
            log.info("%s: training already finished (%d iterations); pass --overwrite to train again", last_file, total)
            metrics = _add_ratio(artifacts.read_json(artifacts.metrics_path(out_dir)), cfg)
            if info.is_main:
                artifacts.write_metrics(out_dir, metrics)
            return metrics

    seed_everything(cfg.seed)
    # A resumed model gets its weights from the checkpoint: no need to fetch ImageNet weights again.
    model = build_seg_model(cfg.model, dataset.num_classes, "none" if checkpoint else cfg.weights_backbone).to(device)
    backbone_params, head_params = model.parameter_groups()
    if cfg.freeze_bn:
        freeze_batchnorm(model.backbone)
    optimizer = sgd_with_head(backbone_params, head_params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                              momentum=cfg.momentum, head_lr_mult=cfg.head_lr_mult)
    scheduler = poly_scheduler(optimizer, total, power=cfg.poly_power)
    state = {"iteration": 0, "best_val_miou": None, "best_iteration": None, "history": [], "val_miou": None,
             "val_summary": None, "seconds": 0.0}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state.update({key: checkpoint[key] for key in state if key in checkpoint})
        if info.is_main:
            log.info("resuming %s at iteration %d of %d", last_file, state["iteration"], total)

    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        artifacts.write_config(out_dir, cfg, total_iterations=total, num_train_images=len(train_ids),
                               classes=dataset.classes, world_size=info.world_size, device=str(device))

    train_model = model
    if info.distributed:
        if device.type == "cuda":
            train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    workers = min(default_workers(), 4) if cfg.workers is None else cfg.workers
    sampler = IterationBatchSampler(train_set, cfg.batch_size, cfg.seed, info, state["iteration"], stop)
    loader = DataLoader(SeededItems(train_set), batch_sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda")

    def save(which: str) -> None:
        if not info.is_main:
            return
        artifacts.save_checkpoint(artifacts.checkpoint_path(out_dir, which), {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "iteration": state["iteration"], "epoch": state["iteration"] * cfg.batch_size / len(sampler.sampler),
            "total_iterations": total, "config": _plain(cfg), "classes": list(dataset.classes),
            "arch": {"model": cfg.model, "num_classes": dataset.num_classes},
            **{key: state[key] for key in state if key != "iteration"},
        })

    started = time.perf_counter() - state["seconds"]
    running_loss, running_count = 0.0, 0
    train_model.train()
    if cfg.freeze_bn:
        freeze_batchnorm(model.backbone)
    progress = progress_bar(total=stop, initial=state["iteration"], desc="train-seg", unit="it", show=info.is_main)
    for batch in loader:
        iteration = state["iteration"] + 1
        # Dropout in the ASPP head draws from torch's generator: seed it per iteration so a resumed
        # run draws the same masks as an uninterrupted one.
        torch.manual_seed(derive_seed(cfg.seed, info.rank, iteration))
        images, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        weight = batch[2].to(device, non_blocking=True) if len(batch) > 2 else None
        loss = segmentation_loss(train_model(images), target, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        state["iteration"] = iteration
        running_loss, running_count = running_loss + loss.item(), running_count + 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if iteration % cfg.log_every == 0 or iteration == total:
            loss_mean, = mean_over_ranks([running_loss / running_count], info, device)
            state["history"].append({"iteration": iteration, "loss": loss_mean, "lr": optimizer.param_groups[0]["lr"]})
            running_loss, running_count = 0.0, 0
        if cfg.val_split is not None and (iteration == total or (cfg.eval_every and iteration % cfg.eval_every == 0)):
            matrix = evaluate_model(model, dataset, cfg.val_split, device, info)
            miou = matrix.miou()
            state["val_miou"], state["val_summary"] = miou, matrix.summary(dataset.classes)
            state["history"].append({"iteration": iteration, "val_miou": miou})
            if info.is_main:
                log.info("iteration %d: %s mIoU %.4f", iteration, cfg.val_split, miou)
            train_model.train()
            if cfg.freeze_bn:
                freeze_batchnorm(model.backbone)
            state["seconds"] = time.perf_counter() - started
            if state["best_val_miou"] is None or miou > state["best_val_miou"]:
                state["best_val_miou"], state["best_iteration"] = miou, iteration
                save("best")
            save("last")
    progress.close()
    state["seconds"] = time.perf_counter() - started
    save("last")

    finished = state["iteration"] >= total
    metrics = {
        "labels": GT_LABELS if label_dir is None else str(label_dir),
        "raw": cfg.reliability_dir is not None,
        "model": cfg.model,
        "finished": finished,
        "iteration": state["iteration"],
        "total_iterations": total,
        "val_split": cfg.val_split,
        "val_miou": state["val_miou"] if finished else None,
        "best_val_miou": state["best_val_miou"],
        "best_iteration": state["best_iteration"],
        "seconds": round(state["seconds"], 2),
        "history": state["history"],
    }
    if finished and state["val_summary"] is not None:
        metrics["val"] = state["val_summary"]
    if finished:
        metrics = _add_ratio(metrics, cfg)
    if info.is_main:
        artifacts.write_metrics(out_dir, metrics)
        if finished:
            summary = f"{cfg.val_split} mIoU {metrics['val_miou']:.4f}" if cfg.val_split else "no validation"
            if metrics.get("weak_full_ratio") is not None:
                summary += f", weak/full {metrics['weak_full_ratio']:.3f}"
            log.info("train-seg finished after %d iterations: %s", total, summary)
    return metrics


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
@click.option("--weights-backbone", "--weights", "weights_backbone", default="imagenet", show_default=True,
              help="Backbone initialisation: imagenet, none or a state_dict file.")
@click.option("--crop-size", type=click.IntRange(min=8), default=321, show_default=True)
@click.option("--scale-range", default="0.5,1.5", show_default=True, callback=options.positive_pair,
              help="MIN,MAX random rescale factors.")
@click.option("--jitter/--no-jitter", default=False, show_default=True, help="Colour jitter.")
@click.option("--batch-size", type=click.IntRange(min=2), default=10, show_default=True)
@click.option("--iterations", type=click.IntRange(min=1), default=None, help="Training iterations [default: 20000].")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Train for this many passes over the split instead of --iterations.")
@click.option("--stop-at", type=click.IntRange(min=1), default=None,
              help="Stop after this iteration (the schedule still spans the whole run); continue with --resume.")
@options.sgd_options(lr=0.001, head="ASPP head")
@click.option("--freeze-bn", is_flag=True, help="Freeze the backbone's BatchNorm (small batches).")
@click.option("--eval-every", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Validate (and checkpoint) every K iterations; 0 = only at the end.")
@click.option("--log-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Record the mean loss every K iterations in metrics.json.")
@click.option("--upper-bound", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder of a finished --labels gt run; metrics.json then records weak/full.")
@options.device_option
@options.seed_option
@options.workers_option
@options.overwrite_option
def command(root, dataset, split, val_split, labels, reliability_dir, raw, out_dir, model, weights_backbone, crop_size,
            scale_range, jitter, batch_size, iterations, epochs, stop_at, lr, head_lr_mult, weight_decay, momentum,
            poly_power, freeze_bn, eval_every, log_every, upper_bound, device, seed, workers, overwrite):
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
        val_split=None if val_split.lower() == "none" else val_split, model=model, weights_backbone=weights_backbone,
        crop_size=crop_size, scale_range=scale_range, jitter=jitter, batch_size=batch_size, iterations=iterations,
        epochs=epochs, stop_at=stop_at, lr=lr, head_lr_mult=head_lr_mult, weight_decay=weight_decay, momentum=momentum,
        poly_power=poly_power, freeze_bn=freeze_bn, eval_every=eval_every, log_every=log_every,
        upper_bound=upper_bound, device=device, seed=seed, workers=workers, overwrite=overwrite)
    metrics = run(cfg)
    if metrics.get("val_miou") is not None and dist_info().is_main:
        line = f"{cfg.val_split} mIoU {metrics['val_miou']:.4f}"
        if metrics.get("weak_full_ratio") is not None:
            line += f"  weak/full {metrics['weak_full_ratio']:.3f} (upper bound {metrics['upper_bound']['val_miou']:.4f})"
        click.echo(line)
