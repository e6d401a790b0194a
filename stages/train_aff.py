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
from typing import TYPE_CHECKING

import click

from wsss.stages.options import (allow_pickle_setting, amp_setting, cams_setting, dataset_setting, device_setting,
                                 folder_problem, overwrite_setting, pair_problem, positive_pair, root_setting,
                                 seed_setting, settings_command, threads_setting)
from wsss import artifacts
from wsss.crf import PSEUDO_LABEL_CRF
from wsss.datasets.prepared import PreparedDataset
from wsss.device import default_workers, dist_info, seed_everything
from wsss.errors import WsssError
from wsss.models import BACKBONE_NAMES
from wsss.optim import Sgd, sgd_group
from wsss.parallel import imap_images
from wsss.refine import RefineParams, confident_label, confident_thresholds, pooled_fits
from wsss.settings import Settings, fail, setting

if TYPE_CHECKING:
    from wsss.training import TrainState

log = logging.getLogger(__name__)

CONFIDENT_DIR = "confident"
CONFIDENT_SOURCES = ("gmm", "fixed")
# Options that define the optimisation; a checkpoint can only be resumed when they agree.
SCHEDULE_FIELDS = ("cam_dir", "split", "backbone", "embed_dim", "radius", "confident", "fg_thresh", "bg_thresh",
                   "crf", "crop_size", "scale_range", "batch_size", "epochs", "sgd", "seed", "amp")


@dataclass(frozen=True)
class TrainAffConfig(Settings):
    """Options of ``wsss train-aff`` (see ``wsss train-aff --help``); defaults follow AffinityNet."""

    cam_dir: Path = cams_setting()
    root: Path = root_setting()
    out_dir: Path = setting(help="Output folder for confident/<id>.png, last.pth, config.json and metrics.json.",
                            option="--out", validate=folder_problem)
    dataset: str | None = dataset_setting()
    split: str = setting("train", "Training split (its CAMs make the labels).")
    backbone: str = setting("resnet50", "Trunk of the affinity network (torchvision ResNet).",
                            choices=tuple(sorted(BACKBONE_NAMES)))
    weights: str = setting("imagenet", "Trunk initialisation: imagenet, none, a state_dict file (e.g. `wsss "
                                       "pretrain`'s backbone.pth) or a train-cls checkpoint.")
    embed_dim: int = setting(448, "Channels of the affinity embedding.", at_least=8)
    radius: int = setting(5, "Pairs of stride-8 cells closer than this are labelled and learned.", at_least=2)
    confident: str = setting("gmm", "Confident-region thresholds: the pooled GMM of `wsss refine`, or "
                                    "--fg-thresh/--bg-thresh.", choices=CONFIDENT_SOURCES)
    fg_thresh: float = setting(0.30, "With --confident fixed: foreground above this.", above=0, below=1)
    bg_thresh: float = setting(0.05, "With --confident fixed: background below this (at most --fg-thresh).",
                               above=0, below=1)
    crf: bool = setting(True, "Refine both labellings with the dense CRF (`wsss refine`'s --crf values).")
    crop_size: int = setting(448, "Side of the square training crop, in pixels.", at_least=32)
    scale_range: tuple[float, float] = setting((0.7, 1.3), "MIN,MAX random rescale factors before cropping.",
                                               above=0, parse=positive_pair, validate=pair_problem)
    batch_size: int = setting(8, "Images per optimiser step and process.", at_least=2)
    epochs: int = setting(8, "Epochs of the schedule (passes over --split).", at_least=1)
    stop_after: int | None = setting(None, "Stop after this many epochs (the schedule still spans --epochs); "
                                           "continue later with --resume.", at_least=1)
    sgd: Sgd = sgd_group(lr=0.01)
    allow_pickle: bool = allow_pickle_setting()
    amp: str = amp_setting()
    device: str = device_setting()
    seed: int = seed_setting()
    workers: int | None = setting(None, "Worker processes that make the confident labels (default: all cores) and "
                                        "DataLoader workers (default: min(cores, 4)).", at_least=0)
    threads: int | None = threads_setting()
    overwrite: bool = overwrite_setting()

    def check(self) -> None:
        """The fixed confident regions need --bg-thresh <= --fg-thresh."""
        if self.bg_thresh > self.fg_thresh:
            fail("--bg-thresh", f"{self.bg_thresh:g}: must not exceed --fg-thresh {self.fg_thresh:g}")


# --------------------------------------------------------------------------- confident labels


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
    thresholds = confident_thresholds(fits, cfg.fg_thresh, cfg.bg_thresh)
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


def _training_ids(cfg: TrainAffConfig, dataset: PreparedDataset) -> list[str]:
    """The ids of the training split, every one with a CAM file that may be opened; checked before any work."""
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
    # torch and the network are imported here, not at the top, so that `wsss train-aff --help` does not load them
    import torch

    from wsss.affinity import TARGET_KINDS, affinity_loss, pair_affinity, pair_offsets
    from wsss.datasets.torch_data import AffinityDataset
    from wsss.models.affinity import AffinityNet
    from wsss.training import (Loop, RunSpec, Trainee, TrainState, find_resumable, finished_metrics, fit, grad_scaler,
                               start_runtime, step_loader, steps_per_epoch, wrap_distributed)
    from wsss.transforms import train_preset

    runtime = start_runtime(cfg.device, cfg.threads, cfg.amp)
    device, info, precision = runtime.device, runtime.info, runtime.precision
    dataset = PreparedDataset.load(cfg.root, cfg.dataset)
    ids = _training_ids(cfg, dataset)
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
    optimizer = cfg.sgd.optimizer(*model.parameter_groups())
    trainee = Trainee(model, optimizer, cfg.sgd.scheduler(optimizer, spec.total_steps), grad_scaler(precision, device))
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


@settings_command(TrainAffConfig, name="train-aff")
def command(cfg: TrainAffConfig) -> None:
    """Train an affinity network on the confident regions of the CAMs (for `wsss refine --random-walk`)."""
    metrics = run(cfg)
    if not dist_info().is_main:
        return
    losses = [record["loss"] for record in metrics.get("history", []) if "round" in record]
    click.echo(f"trained {metrics['epoch']}/{cfg.epochs} epochs"
               + (f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""))
