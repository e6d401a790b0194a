"""``wsss pretrain``: self-supervised pretraining of the ResNet trunk on the split's images (stage 0).

For users without ImageNet weights (offline machines, licences) or whose images look nothing
like ImageNet (medical, satellite, industrial): the trunk learns from the images alone -- the
image-level labels are never read for training -- and ``train-cls --weights`` /
``train-seg --weights-backbone`` start from it.

Methods (the network, views and probe are :mod:`wsss.selfsup`'s):

* ``--method contrastive`` (default): SimCLR.  Two augmented views of every image (random
  resized crop 0.08-1, flip, colour jitter p 0.8, grayscale p 0.2, blur p 0.5), trunk, global
  pooling, a projection head to 128-d, NT-Xent at ``--temperature`` with the other views of the
  batch -- of every process under torchrun -- as negatives.  ``--queue K`` turns it into MoCo v2:
  keys from a momentum copy of trunk and head (``--key-momentum``) and a queue of the last K keys
  as negatives, the usual answer to the small batches of one GPU or a CPU.  The keys' BatchNorm
  sees the batch shuffled and cut in ``--key-splits`` parts (MoCo's "shuffle BN" on one device),
  so a query cannot find its key by the batch statistics.
* ``--method rotation``: RotNet.  Every image at 0, 90, 180 and 270 degrees; a linear 4-way
  classifier on the pooled features names the angle.

The trunk has the layout the CAM network uses (output stride 16).  SGD with momentum, a linear
warm-up and a cosine schedule; the shared training engine (:mod:`wsss.training`) runs the loop
(epoch checkpoints, resume, ``--amp``, torchrun).

Outputs: ``<out>/backbone.pth`` -- the trunk's state dict under torchvision's ResNet names plus a
``wsss_meta`` block (method, backbone, epochs, images, versions) -- ``last.pth`` (for resuming),
``config.json`` and ``metrics.json`` (loss and pretext accuracy per epoch; a linear probe of
multi-label classification on frozen pooled features, mAP on ``--probe-split``, for the
random initialisation and for the pretrained trunk).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from wsss.stages.options import (amp_setting, dataset_setting, device_setting, folder_problem, loader_workers_setting,
                                 overwrite_setting, root_setting, seed_setting, settings_command, threads_setting)
from wsss import artifacts
from wsss.datasets.prepared import PreparedDataset
from wsss.device import default_workers, dist_info, seed_everything
from wsss.errors import WsssError
from wsss.models import BACKBONE_NAMES, PRETEXT_METHODS
from wsss.optim import cosine_scheduler
from wsss.settings import Settings, fail, setting

if TYPE_CHECKING:
    from wsss.selfsup import Pretext
    from wsss.training import TrainState

log = logging.getLogger(__name__)

SCHEDULE_FIELDS = ("split", "backbone", "method", "crop_size", "min_scale", "batch_size", "epochs", "lr",
                   "weight_decay", "momentum", "warmup_epochs", "temperature", "queue", "key_momentum", "key_splits",
                   "seed", "amp")


@dataclass(frozen=True)
class PretrainConfig(Settings):
    """Options of ``wsss pretrain`` (see ``wsss pretrain --help``); defaults follow SimCLR / MoCo v2."""

    root: Path = root_setting()
    out_dir: Path = setting(help="Output folder for backbone.pth, last.pth, config.json and metrics.json.",
                            option="--out", validate=folder_problem)
    dataset: str | None = dataset_setting()
    split: str = setting("train", "Split whose images are used (their labels never are).")
    probe_split: str | None = setting("val", "Split on which the linear probe is scored (fitted on --split); none "
                                             "skips the probe.")
    backbone: str = setting("resnet50", "Trunk to pretrain (torchvision ResNet).",
                            choices=tuple(sorted(BACKBONE_NAMES)))
    method: str = setting("contrastive", "contrastive: SimCLR (MoCo v2 with --queue); rotation: 4-way rotation "
                                         "prediction.", choices=PRETEXT_METHODS)
    crop_size: int = setting(224, "Side of the square views, in pixels.", at_least=16)
    min_scale: float = setting(0.08, "Smallest area fraction of the random resized crop (contrastive views).",
                               above=0, at_most=1)
    batch_size: int = setting(128, "Images per optimiser step and process.", at_least=2)
    epochs: int = setting(100, "Epochs of the schedule (passes over --split).", at_least=1)
    stop_after: int | None = setting(None, "Stop after this many epochs (the schedule still spans --epochs); "
                                           "continue later with --resume.", at_least=1)
    lr: float = setting(0.3, "Peak learning rate (SGD, cosine schedule after a linear warm-up).", above=0)
    weight_decay: float = setting(1e-4, "L2 weight decay of the weights (not of BatchNorm and biases).", at_least=0)
    momentum: float = setting(0.9, "SGD momentum.", at_least=0, below=1)
    warmup_epochs: int = setting(5, "Epochs of the linear learning-rate warm-up.", at_least=0)
    temperature: float = setting(0.2, "NT-Xent / InfoNCE temperature.", above=0)
    queue: int = setting(0, "MoCo v2 queue of negative keys (0 = SimCLR, negatives from the batch).", at_least=0)
    key_momentum: float = setting(0.99, "With --queue: momentum of the key encoder.", at_least=0, below=1)
    key_splits: int = setting(4, "With --queue: BatchNorm of the keys on this many shuffled sub-batches (shuffle "
                                 "BN).", at_least=1)
    probe_size: int | None = setting(None, "Resize images to SIZE x SIZE for the probe's features (none: their "
                                           "own size).", at_least=16, metavar="SIZE")
    amp: str = amp_setting()
    device: str = device_setting()
    seed: int = seed_setting()
    workers: int | None = loader_workers_setting()
    threads: int | None = threads_setting()
    overwrite: bool = overwrite_setting()

    def check(self) -> None:
        if self.queue and self.method != "contrastive":
            fail("--queue", f"{self.queue}: the MoCo queue belongs to --method contrastive")


# --------------------------------------------------------------------------- the stage


def _training_data(cfg: PretrainConfig) -> PreparedDataset:
    """The prepared dataset, its training split checked non-empty and the probe split present."""
    dataset = PreparedDataset.load(cfg.root, cfg.dataset)
    if not dataset.ids(cfg.split):
        raise WsssError(f"split {cfg.split!r} of {cfg.root} is empty")
    if cfg.probe_split is not None and cfg.probe_split not in dataset.splits:
        raise WsssError(f"--probe-split {cfg.probe_split}: {cfg.root} has no such split (or pass --probe-split none)")
    return dataset


def _backbone_meta(cfg: PretrainConfig, model: Pretext, num_images: int) -> dict:
    """The ``wsss_meta`` block of backbone.pth: how the trunk was made."""
    return {"method": model.name, "backbone": cfg.backbone, "epochs": cfg.epochs, "images": num_images,
            "split": cfg.split, "versions": artifacts.provenance(cfg)["versions"]}


def _summary(cfg: PretrainConfig, state: TrainState, finished: bool) -> dict:
    return {"finished": finished, "method": cfg.method, "backbone": cfg.backbone, "epoch": state.round,
            "epochs": cfg.epochs, "step": state.step, "seconds": round(state.seconds, 2),
            "probe": state.extra.get("probe"), "history": state.history,
            "backbone_file": str(artifacts.pretrained_backbone_path(cfg.out_dir)) if finished else None}


def run(cfg: PretrainConfig) -> dict:
    """Pretrain (or resume) the trunk; return the metrics written to ``<out>/metrics.json``."""
    # torch and the network are imported here, not at the top, so that `wsss pretrain --help` does not load them
    import torch

    from wsss.selfsup import Pretext, PretextImages, pretext_views, probe_trunk, save_backbone
    from wsss.training import (Loop, RunSpec, Trainee, TrainState, find_resumable, finished_metrics, fit, grad_scaler,
                               start_runtime, step_loader, steps_per_epoch, wrap_distributed)

    runtime = start_runtime(cfg.device, cfg.threads, cfg.amp)
    device, info, precision = runtime.device, runtime.info, runtime.precision
    dataset = _training_data(cfg)
    images = PretextImages(dataset, cfg.split, pretext_views(cfg.method, crop_size=cfg.crop_size,
                                                             min_scale=cfg.min_scale))
    batch_size = min(cfg.batch_size, max(2, len(images) // info.world_size))
    per_epoch = steps_per_epoch(len(images), batch_size, info.world_size)
    spec = RunSpec(Path(cfg.out_dir), cfg, SCHEDULE_FIELDS, cfg.epochs * per_epoch, dataset.classes,
                   {"backbone": cfg.backbone, "method": cfg.method}, cfg.overwrite)
    checkpoint = find_resumable(spec)
    if (metrics := finished_metrics(spec, checkpoint)) is not None:
        return metrics
    seed_everything(cfg.seed)
    model = Pretext(cfg.backbone, cfg.method, temperature=cfg.temperature, queue=cfg.queue,
                    key_momentum=cfg.key_momentum, key_splits=cfg.key_splits).to(device)
    model = precision.module(model)
    optimizer = torch.optim.SGD(model.parameter_groups(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    trainee = Trainee(model, optimizer, cosine_scheduler(optimizer, spec.total_steps, cfg.warmup_epochs * per_epoch),
                      grad_scaler(precision, device))
    state = trainee.restore(checkpoint) if checkpoint else TrainState()
    workers = min(default_workers(), 4) if cfg.workers is None else cfg.workers
    if info.is_main:
        artifacts.write_config(spec.out_dir, cfg, num_images=len(images), steps_per_epoch=per_epoch,
                               batch_size=batch_size, world_size=info.world_size, device=str(device),
                               precision=precision.name)

    def probe() -> dict | None:
        if cfg.probe_split is None:
            return None
        return probe_trunk(model.trunk, dataset, cfg.split, cfg.probe_split, device, precision, size=cfg.probe_size,
                           workers=workers, seed=cfg.seed)

    if state.step == 0 and info.is_main:
        state.extra["probe"] = {"random_init": probe()}
    network = wrap_distributed(model, device, info)

    def step_loss(batch, step):
        moved = [tensor.to(device, non_blocking=True) for tensor in (batch if isinstance(batch, list) else [batch])]
        return network(moved if len(moved) > 1 else moved[0])

    stop = spec.total_steps if cfg.stop_after is None else min(spec.total_steps, cfg.stop_after * per_epoch)
    loop = Loop(step_loss, round_steps=per_epoch, summarize=lambda s, done: _summary(cfg, s, done), stop_at=stop,
                desc=f"pretrain {cfg.method}", seed=cfg.seed)
    loader = step_loader(images, batch_size, cfg.seed, info, state.step, stop, workers, device)
    state = fit(trainee, loader, loop, spec, state, precision=precision, device=device, info=info)
    finished = state.step >= spec.total_steps
    if finished and info.is_main:
        save_backbone(artifacts.pretrained_backbone_path(spec.out_dir), model.trunk,
                      _backbone_meta(cfg, model, len(images)))
        state.extra.setdefault("probe", {})["pretrained"] = probe()
        artifacts.write_metrics(spec.out_dir, _summary(cfg, state, finished))
    return _summary(cfg, state, finished)


# --------------------------------------------------------------------------- command line


@settings_command(PretrainConfig, name="pretrain")
def command(cfg: PretrainConfig) -> None:
    """Pretrain a ResNet trunk on unlabeled images (contrastive or rotation); writes OUT/backbone.pth."""
    metrics = run(cfg)
    if not dist_info().is_main:
        return
    line = f"pretrained {metrics['epoch']}/{cfg.epochs} epochs ({cfg.method})"
    probe = metrics.get("probe") or {}
    pretrained, random_init = (probe.get("pretrained") or {}).get("map"), (probe.get("random_init") or {}).get("map")
    if pretrained is not None and random_init is not None:
        line += f"; linear-probe mAP {pretrained:.4f} (random init {random_init:.4f})"
    if metrics.get("backbone_file"):
        line += f" -> {metrics['backbone_file']}"
    click.echo(line)
