"""``wsss train-aff``: learn pixel affinities from the CAMs' confident regions (AffinityNet, IRN).

1. **Confident labels** (``<out>/confident/<id>.png``, resumable): foreground where a CAM is above
   a high threshold, background where every CAM is below a low one, 255 between; each of the two
   labellings is refined by the dense CRF, as IRN does (:func:`wsss.refine.confident_label`).
   ``--confident gmm`` (default) takes the thresholds from the pooled Gaussian mixture of
   ``wsss refine``: high = each class's upper boundary, low = the boundary between the two lowest
   components of the overall fit (CoSA's low/high pair).  ``--confident fixed`` uses ``--fg-thresh``
   / ``--bg-thresh`` (IRN: 0.30 / 0.05 for CAMs whose best background threshold is about 0.15-0.25).
2. **Affinity network** (:class:`wsss.models.affinity.AffinityNet`): a ResNet trunk and a
   multi-stage head embed every stride-8 cell; the affinity of two cells within ``--radius`` is
   ``exp(-mean |f_p - f_q|)``; the loss is AffinityNet's balanced cross-entropy over
   background-background, foreground-foreground (same class) and cross pairs
   (:func:`wsss.affinity.affinity_loss`).  The trunk starts from ``--weights`` -- ImageNet, a
   ``wsss pretrain`` backbone, or the train-cls checkpoint whose CAMs made the labels -- and trains
   at ``--lr``, the head at ``--head-lr-mult`` times that.

The shared engine (:mod:`wsss.training`) runs the loop: epoch checkpoints, resume, ``--amp``,
torchrun.  ``wsss refine --random-walk <out>`` then spreads the CAMs over the learned graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from wsss.stages import options
from wsss import artifacts
from wsss.affinity import TARGET_KINDS, affinity_loss, pair_affinity, pair_offsets
from wsss.crf import PSEUDO_LABEL_CRF
from wsss.datasets.prepared import PreparedDataset
from wsss.datasets.torch_data import AffinityDataset
from wsss.device import default_workers, dist_info, seed_everything
from wsss.errors import WsssError
from wsss.models.affinity import AffinityNet
from wsss.models.backbones import BACKBONES
from wsss.optim import poly_scheduler, sgd_with_head
from wsss.parallel import imap_images
from wsss.refine import RefineParams, SplitFits, confident_label, pooled_fits
from wsss.training import (Loop, RunSpec, Trainee, TrainState, find_resumable, finished_metrics, fit, grad_scaler,
                           start_runtime, step_loader, steps_per_epoch, wrap_distributed)
from wsss.transforms import train_preset

log = logging.getLogger(__name__)

CONFIDENT_DIR = "confident"
CONFIDENT_SOURCES = ("gmm", "fixed")
SCHEDULE_FIELDS = ("cam_dir", "split", "backbone", "embed_dim", "radius", "confident", "fg_thresh", "bg_thresh",
                   "crf", "crop_size", "scale_range", "batch_size", "epochs", "lr", "head_lr_mult", "weight_decay",
                   "momentum", "poly_power", "seed", "amp")


@dataclass(frozen=True)
class TrainAffConfig:
    """Options of ``wsss train-aff`` (see ``wsss train-aff --help``); defaults follow AffinityNet."""

    cam_dir: Path
    root: Path
    out_dir: Path
    dataset: str | None = None
    split: str = "train"
    backbone: str = "resnet50"
    weights: str = "imagenet"
    embed_dim: int = 448
    radius: int = 5
    confident: str = "gmm"
    fg_thresh: float = 0.30
    bg_thresh: float = 0.05
    crf: bool = True
    crop_size: int = 448
    scale_range: tuple[float, float] = (0.7, 1.3)
    batch_size: int = 8
    epochs: int = 8
    stop_after: int | None = None
    lr: float = 0.01
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    momentum: float = 0.9
    poly_power: float = 0.9
    allow_pickle: bool = False
    amp: str = "auto"
    device: str = "auto"
    seed: int = 0
    workers: int | None = None
    threads: int | None = None
    overwrite: bool = False


# --------------------------------------------------------------------------- confident labels


def confident_thresholds(fits: SplitFits | None, cfg: TrainAffConfig) -> dict:
    """``{"fg": {class: threshold} or float, "bg": float}`` for the confident regions."""
    if fits is None:
        return {"fg": cfg.fg_thresh, "bg": cfg.bg_thresh}
    fg = {key: fits.for_class(key).threshold for key in fits.per_class}
    fg["default"] = fits.overall.threshold
    low = fits.overall.fit.lower_crossing() if fits.overall.fit is not None else None
    bg = low if low is not None and len(fits.overall.fit.means) > 2 else 0.5 * fits.overall.threshold
    return {"fg": fg, "bg": float(min(bg, min(fg.values())))}


_STATE: dict = {}


def _init_labeller(cfg: TrainAffConfig, dataset: PreparedDataset, thresholds: dict) -> None:
    _STATE.update(cfg=cfg, dataset=dataset, thresholds=thresholds)


def _label_one(image_id: str) -> None:
    cfg, dataset, thresholds = _STATE["cfg"], _STATE["dataset"], _STATE["thresholds"]
    keys, cams = artifacts.read_cam(artifacts.find_cam(cfg.cam_dir, image_id), allow_pickle=cfg.allow_pickle,
                                    num_classes=dataset.num_classes)
    fg = thresholds["fg"]
    fg_per_plane = [fg.get(int(key), fg["default"]) if isinstance(fg, dict) else fg for key in keys]
    image = dataset.read_image(cfg.split, image_id) if cfg.crf else None
    label = confident_label(image, keys, cams, fg_per_plane, [thresholds["bg"]] * len(keys),
                            crf=PSEUDO_LABEL_CRF if cfg.crf else None)
    artifacts.write_label_png(artifacts.label_path(Path(cfg.out_dir) / CONFIDENT_DIR, image_id), label)


def write_confident_labels(cfg: TrainAffConfig, dataset: PreparedDataset, ids: list[str], workers: int) -> dict:
    """Write the confident-region labels of ``ids`` (skipping readable ones); return the thresholds used."""
    fits = None
    if cfg.confident == "gmm":
        files = {image_id: artifacts.find_cam(cfg.cam_dir, image_id) for image_id in ids}
        # the confident regions use each class's own pooled mixture (as measured in bench/affinity_quality.md)
        fits = pooled_fits(files, RefineParams(gmm_per_class=True), seed=cfg.seed, workers=workers,
                           allow_pickle=cfg.allow_pickle, num_classes=dataset.num_classes)
    thresholds = confident_thresholds(fits, cfg)
    folder = Path(cfg.out_dir) / CONFIDENT_DIR
    todo = [image_id for image_id in ids if cfg.overwrite or not _readable(artifacts.label_path(folder, image_id))]
    list(imap_images(_label_one, todo, workers, "confident labels", initializer=_init_labeller,
                     initargs=(cfg, dataset, thresholds)))
    return thresholds


def _readable(path: Path) -> bool:
    try:
        artifacts.read_label_png(path)
    except WsssError:
        return False
    return True


# --------------------------------------------------------------------------- the stage


def _check(cfg: TrainAffConfig, dataset: PreparedDataset) -> list[str]:
    if cfg.backbone not in BACKBONES:
        raise WsssError(f"--backbone {cfg.backbone!r}: choose from {sorted(BACKBONES)}")
    if cfg.confident not in CONFIDENT_SOURCES:
        raise WsssError(f"--confident {cfg.confident!r}: choose gmm or fixed")
    if not 0 < cfg.bg_thresh <= cfg.fg_thresh < 1:
        raise WsssError(f"--bg-thresh {cfg.bg_thresh} and --fg-thresh {cfg.fg_thresh}: need 0 < bg <= fg < 1")
    if cfg.radius < 2 or cfg.crop_size < 32 or cfg.batch_size < 2:
        raise WsssError("--radius must be >= 2, --crop-size >= 32 and --batch-size >= 2")
    ids = dataset.ids(cfg.split)
    if not Path(cfg.cam_dir).is_dir() or ids:
        artifacts.require_cams(cfg.cam_dir, ids, cfg.split, cfg.allow_pickle)
    if not ids:
        raise WsssError(f"split {cfg.split!r} of {cfg.root} is empty")
    return ids


def _summary(cfg: TrainAffConfig, state: TrainState, finished: bool) -> dict:
    return {"finished": finished, "backbone": cfg.backbone, "epoch": state.round, "epochs": cfg.epochs,
            "step": state.step, "seconds": round(state.seconds, 2), "confident": state.extra.get("confident"),
            "history": state.history}


def run(cfg: TrainAffConfig) -> dict:
    """Make the confident labels and train (or resume) the affinity network; return the metrics."""
    runtime = start_runtime(cfg.device, cfg.threads, cfg.amp)
    device, info, precision = runtime.device, runtime.info, runtime.precision
    dataset = PreparedDataset.load(cfg.root, cfg.dataset)
    ids = _check(cfg, dataset)
    offsets = pair_offsets(cfg.radius)
    arch = {"kind": "affinity", "backbone": cfg.backbone, "embed_dim": cfg.embed_dim, "radius": cfg.radius,
            "stride": AffinityNet.stride}
    workers = default_workers() if cfg.workers is None else cfg.workers
    train_set = AffinityDataset(dataset, cfg.split, train_preset(crop_size=cfg.crop_size, scale_range=cfg.scale_range,
                                                                 jitter=False),
                                Path(cfg.out_dir) / CONFIDENT_DIR, offsets)
    batch_size = min(cfg.batch_size, max(2, len(ids) // info.world_size))
    per_epoch = steps_per_epoch(len(ids), batch_size, info.world_size)
    spec = RunSpec(Path(cfg.out_dir), cfg, SCHEDULE_FIELDS, cfg.epochs * per_epoch, dataset.classes, arch,
                   cfg.overwrite)
    checkpoint = find_resumable(spec)
    if (metrics := finished_metrics(spec, checkpoint)) is not None:
        return metrics
    if info.is_main:
        thresholds = write_confident_labels(cfg, dataset, ids, workers)
    if info.distributed:
        torch.distributed.barrier()  # every rank trains on the labels rank 0 wrote
    seed_everything(cfg.seed)
    model = AffinityNet(cfg.backbone, "none" if checkpoint else cfg.weights, embed_dim=cfg.embed_dim).to(device)
    model = precision.module(model)
    optimizer = sgd_with_head(*model.parameter_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                              momentum=cfg.momentum, head_lr_mult=cfg.head_lr_mult)
    trainee = Trainee(model, optimizer, poly_scheduler(optimizer, spec.total_steps, power=cfg.poly_power),
                      grad_scaler(precision, device))
    state = trainee.restore(checkpoint) if checkpoint else TrainState()
    if info.is_main:
        state.extra["confident"] = {"source": cfg.confident, "thresholds": thresholds}
        artifacts.write_config(spec.out_dir, cfg, arch=arch, num_train_images=len(ids), steps_per_epoch=per_epoch,
                               world_size=info.world_size, device=str(device), precision=precision.name)
    network = wrap_distributed(model, device, info)

    def step_loss(batch, step):
        images, targets = (tensor.to(device, non_blocking=True) for tensor in batch)
        affinity = pair_affinity(network(precision.images(images)).float(), offsets)
        return affinity_loss(affinity, {kind: targets[:, index] for index, kind in enumerate(TARGET_KINDS)})

    stop = spec.total_steps if cfg.stop_after is None else min(spec.total_steps, cfg.stop_after * per_epoch)
    loop = Loop(step_loss, round_steps=per_epoch, summarize=lambda s, done: _summary(cfg, s, done), stop_at=stop,
                desc="train-aff", seed=cfg.seed)
    loader = step_loader(train_set, batch_size, cfg.seed, info, state.step, stop,
                         min(default_workers(), 4) if cfg.workers is None else cfg.workers, device)
    state = fit(trainee, loader, loop, spec, state, precision=precision, device=device, info=info)
    return _summary(cfg, state, state.step >= spec.total_steps)


# --------------------------------------------------------------------------- command line


@click.command(short_help="Learn pixel affinities from the CAMs' confident regions.")
@options.cams_option()
@options.root_option()
@options.dataset_option()
@options.split_option("train", "Training split (its CAMs make the labels).")
@options.out_option("Output folder for confident/<id>.png, last.pth, config.json and metrics.json.")
@click.option("--backbone", type=click.Choice(sorted(BACKBONES)), default="resnet50", show_default=True)
@click.option("--weights", default="imagenet", show_default=True,
              help="Trunk initialisation: imagenet, none, a state_dict file (e.g. `wsss pretrain`'s backbone.pth) "
                   "or a train-cls checkpoint.")
@click.option("--embed-dim", type=click.IntRange(min=8), default=448, show_default=True,
              help="Channels of the affinity embedding.")
@click.option("--radius", type=click.IntRange(min=2), default=5, show_default=True,
              help="Pairs of stride-8 cells closer than this are labelled and learned.")
@click.option("--confident", type=click.Choice(CONFIDENT_SOURCES), default="gmm", show_default=True,
              help="Confident-region thresholds: the pooled GMM of `wsss refine`, or --fg-thresh/--bg-thresh.")
@click.option("--fg-thresh", type=options.FiniteFloat(0, 1, min_open=True, max_open=True), default=0.30,
              show_default=True, help="With --confident fixed: foreground above this.")
@click.option("--bg-thresh", type=options.FiniteFloat(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True, help="With --confident fixed: background below this.")
@click.option("--crf/--no-crf", default=True, show_default=True, help="Refine both labellings with the dense CRF.")
@click.option("--crop-size", type=click.IntRange(min=32), default=448, show_default=True)
@click.option("--scale-range", default="0.7,1.3", show_default=True, callback=options.old_positive_pair,
              help="MIN,MAX random rescale factors before cropping.")
@click.option("--batch-size", type=click.IntRange(min=2), default=8, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--stop-after", type=click.IntRange(min=1), default=None,
              help="Stop after this epoch (the schedule still spans --epochs); continue later with --resume.")
@options.sgd_options(lr=0.01, head="Affinity head")
@options.allow_pickle_option
@options.amp_option
@options.device_option
@options.seed_option
@options.workers_option
@options.threads_option
@options.overwrite_option
def command(cam_dir, root, dataset, split, out_dir, backbone, weights, embed_dim, radius, confident, fg_thresh,
            bg_thresh, crf, crop_size, scale_range, batch_size, epochs, stop_after, lr, head_lr_mult, weight_decay,
            momentum, poly_power, allow_pickle, amp, device, seed, workers, threads, overwrite):
    """Train an affinity network on the confident regions of the CAMs (for `wsss refine --random-walk`)."""
    cfg = TrainAffConfig(cam_dir=cam_dir, root=root, out_dir=out_dir, dataset=dataset, split=split, backbone=backbone,
                         weights=weights, embed_dim=embed_dim, radius=radius, confident=confident,
                         fg_thresh=fg_thresh, bg_thresh=bg_thresh, crf=crf, crop_size=crop_size,
                         scale_range=scale_range, batch_size=batch_size, epochs=epochs, stop_after=stop_after, lr=lr,
                         head_lr_mult=head_lr_mult, weight_decay=weight_decay, momentum=momentum,
                         poly_power=poly_power, allow_pickle=allow_pickle, amp=amp, device=device, seed=seed,
                         workers=workers, threads=threads, overwrite=overwrite)
    metrics = run(cfg)
    if not dist_info().is_main:
        return
    losses = [record["loss"] for record in metrics.get("history", []) if "round" in record]
    click.echo(f"trained {metrics['epoch']}/{cfg.epochs} epochs"
               + (f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""))
