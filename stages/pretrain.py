"""``wsss pretrain``: self-supervised pretraining of the ResNet trunk on the split's images (stage 0).

For users without ImageNet weights (offline machines, licences) or whose images look nothing
like ImageNet (medical, satellite, industrial): the trunk learns from the images alone -- the
image-level labels are never read for training -- and ``train-cls --weights`` /
``train-seg --weights-backbone`` start from it.

Methods (:mod:`wsss.selfsup`):

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

import io
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from wsss.stages import options
from wsss import artifacts
from wsss.datasets.prepared import PreparedDataset
from wsss.device import default_workers, dist_info, seed_everything
from wsss.errors import WsssError
from wsss.inference import split_batches, to_model_input
from wsss.models.backbones import BACKBONES, META_KEY, backbone_channels, build_resnet, trunk_state_dict
from wsss.optim import cosine_scheduler
from wsss.selfsup import (ContrastiveViews, NegativeQueue, ProjectionHead, RotationHead, RotationView, linear_probe,
                          moco_loss, momentum_copy, momentum_update, nt_xent_loss, rotate_batch)
from wsss.training import (Loop, Precision, RunSpec, Trainee, TrainState, find_resumable, finished_metrics, fit,
                           grad_scaler, start_runtime, step_loader, steps_per_epoch, wrap_distributed)

log = logging.getLogger(__name__)

METHODS = ("contrastive", "rotation")
BACKBONE_FILE = "backbone.pth"
SCHEDULE_FIELDS = ("split", "backbone", "method", "crop_size", "min_scale", "batch_size", "epochs", "lr",
                   "weight_decay", "momentum", "warmup_epochs", "temperature", "queue", "key_momentum", "key_splits",
                   "seed", "amp")


@dataclass(frozen=True)
class PretrainConfig:
    """Options of ``wsss pretrain`` (see ``wsss pretrain --help``)."""

    root: Path
    out_dir: Path
    dataset: str | None = None
    split: str = "train"
    probe_split: str | None = "val"
    backbone: str = "resnet50"
    method: str = "contrastive"
    crop_size: int = 224
    min_scale: float = 0.08
    batch_size: int = 128
    epochs: int = 100
    stop_after: int | None = None
    lr: float = 0.3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: int = 5
    temperature: float = 0.2
    queue: int = 0
    key_momentum: float = 0.99
    key_splits: int = 4
    probe_size: int | None = None
    amp: str = "auto"
    device: str = "auto"
    seed: int = 0
    workers: int | None = None
    threads: int | None = None
    overwrite: bool = False


# --------------------------------------------------------------------------- data and networks


class PretextImages(Dataset):
    """The split's images as pretext inputs: two views (contrastive) or one square view (rotation).

    The augmentation draws from a NumPy generator seeded from Python's ``random``, which the
    engine's :class:`~wsss.training.SeededItems` seeds per item.
    """

    def __init__(self, dataset: PreparedDataset, split: str, views):
        self.dataset, self.split, self.views, self.ids = dataset, split, views, dataset.ids(split)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        rng = np.random.default_rng(random.getrandbits(63))
        return self.views(self.dataset.read_image(self.split, self.ids[index]), rng)


class Pretext(nn.Module):
    """Trunk + pretext head; ``forward(batch)`` returns the step's loss terms.

    Args:
        backbone: ResNet name; the trunk has output stride 16 like the CAM network's.
        method: ``contrastive`` or ``rotation``.
        queue: MoCo negatives (0 = SimCLR with in-batch negatives).
    """

    def __init__(self, backbone: str, method: str, *, temperature: float = 0.2, queue: int = 0,
                 key_momentum: float = 0.99, key_splits: int = 4):
        super().__init__()
        self.method, self.temperature = method, temperature
        self.key_momentum, self.key_splits = key_momentum, key_splits
        self.trunk = build_resnet(backbone, "none", output_stride=16)
        channels = backbone_channels(backbone)
        self.head = RotationHead(channels) if method == "rotation" else ProjectionHead(channels)
        self.queue = None
        if method == "contrastive" and queue > 0:
            self.key_trunk, self.key_head = momentum_copy(self.trunk), momentum_copy(self.head)
            self.queue = NegativeQueue(queue, 128, generator=torch.Generator().manual_seed(0))

    def parameter_groups(self) -> list[dict]:
        """SGD groups: weight decay on weights, none on BatchNorm and biases (SimCLR/MoCo practice)."""
        decay, no_decay = [], []
        for name, parameter in [*self.trunk.named_parameters(), *self.head.named_parameters()]:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _keys(self, views: torch.Tensor) -> torch.Tensor:
        """Keys of the momentum encoder, BatchNorm on shuffled sub-batches (shuffle BN on one device)."""
        momentum_update(self.trunk, self.key_trunk, self.key_momentum)
        momentum_update(self.head, self.key_head, self.key_momentum)
        order = torch.randperm(views.shape[0], device=views.device)
        splits = max(1, min(self.key_splits, views.shape[0] // 2))  # BatchNorm needs two samples per part
        parts = [self.key_head(self.key_trunk(part)) for part in views[order].chunk(splits)]
        keys = torch.empty_like(torch.cat(parts))
        keys[order] = torch.cat(parts)
        return keys

    def forward(self, batch) -> dict[str, torch.Tensor]:
        if self.method == "rotation":
            images, targets = rotate_batch(batch)
            logits = self.head(self.trunk(images)).float()
            return {"total": F.cross_entropy(logits, targets),
                    "accuracy": (logits.argmax(1) == targets).float().mean()}
        first, second = batch
        if self.queue is None:
            z1, z2 = self.head(self.trunk(first)), self.head(self.trunk(second))
            return {"total": nt_xent_loss(z1.float(), z2.float(), self.temperature)}
        with torch.no_grad():
            k1, k2 = self._keys(first), self._keys(second)
        q1, q2 = self.head(self.trunk(first)).float(), self.head(self.trunk(second)).float()
        negatives = self.queue.keys.clone()  # enqueue below updates the queue in place; backward needs these
        # symmetric MoCo loss: each view is once the query and once the key
        loss = 0.5 * (moco_loss(q1, k2.float(), negatives, self.temperature)
                      + moco_loss(q2, k1.float(), negatives, self.temperature))
        self.queue.enqueue(torch.cat([k1, k2]).float())
        return {"total": loss}


# --------------------------------------------------------------------------- linear probe


@torch.no_grad()
def probe_features(trunk: nn.Module, dataset: PreparedDataset, split: str, device: torch.device,
                   precision: Precision, size: int | None, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Globally pooled trunk features [N, C] and multi-hot labels [N, K] of a split (eval mode)."""
    was_training = trunk.training
    trunk.eval()
    ids = dataset.ids(split)
    position = {image_id: index for index, image_id in enumerate(ids)}
    features = None
    for batch_ids, images, _ in split_batches(dataset, split, ids, batch_size=16, workers=workers, device=device):
        inputs = to_model_input(images)
        if size is not None:
            inputs = F.interpolate(inputs, size=(size, size), mode="bilinear", align_corners=False)
        with precision.autocast(device):
            pooled = trunk(precision.images(inputs)).float().mean(dim=(2, 3)).cpu().numpy()
        if features is None:
            features = np.zeros((len(ids), pooled.shape[1]), np.float32)
        features[[position[image_id] for image_id in batch_ids]] = pooled
    trunk.train(was_training)
    return features, np.stack([dataset.multi_hot(image_id) for image_id in ids])


def run_probe(trunk, dataset: PreparedDataset, cfg: PretrainConfig, device, precision, workers: int) -> dict | None:
    """Linear-probe mAP of the trunk: logistic regression fitted on the training split, scored on
    ``--probe-split`` (None when there is no such split with labels)."""
    if cfg.probe_split is None:
        return None
    train = probe_features(trunk, dataset, cfg.split, device, precision, cfg.probe_size, workers)
    val = probe_features(trunk, dataset, cfg.probe_split, device, precision, cfg.probe_size, workers)
    result = linear_probe(*train, *val, seed=cfg.seed)
    return {"map": result["map"], "ap": {name: ap for name, ap in zip(dataset.classes[1:], result["ap"])}}


# --------------------------------------------------------------------------- the stage


def _check(cfg: PretrainConfig, dataset: PreparedDataset) -> None:
    if cfg.backbone not in BACKBONES:
        raise WsssError(f"--backbone {cfg.backbone!r}: choose from {sorted(BACKBONES)}")
    if cfg.method not in METHODS:
        raise WsssError(f"--method {cfg.method!r}: choose from {', '.join(METHODS)}")
    if cfg.queue and cfg.method != "contrastive":
        raise WsssError("--queue (MoCo) belongs to --method contrastive")
    if not dataset.ids(cfg.split):
        raise WsssError(f"split {cfg.split!r} of {cfg.root} is empty")
    if cfg.probe_split is not None and cfg.probe_split not in dataset.splits:
        raise WsssError(f"--probe-split {cfg.probe_split}: {cfg.root} has no such split (or pass --probe-split none)")


def export_backbone(out_dir: Path, model: Pretext, cfg: PretrainConfig, num_images: int) -> Path:
    """Write ``<out>/backbone.pth``: the trunk under torchvision names + the ``wsss_meta`` block."""
    meta = artifacts.provenance(cfg)
    meta = {"method": cfg.method if not cfg.queue else "contrastive-moco", "backbone": cfg.backbone,
            "epochs": cfg.epochs, "images": num_images, "split": cfg.split, "versions": meta["versions"]}
    path = Path(out_dir) / BACKBONE_FILE
    buffer = io.BytesIO()
    torch.save({**trunk_state_dict(model.trunk), META_KEY: meta}, buffer)
    with artifacts.atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return path


def _summary(cfg: PretrainConfig, state: TrainState, finished: bool) -> dict:
    return {"finished": finished, "method": cfg.method, "backbone": cfg.backbone, "epoch": state.round,
            "epochs": cfg.epochs, "step": state.step, "seconds": round(state.seconds, 2),
            "probe": state.extra.get("probe"), "history": state.history,
            "backbone_file": str(Path(cfg.out_dir) / BACKBONE_FILE) if finished else None}


def run(cfg: PretrainConfig) -> dict:
    """Pretrain (or resume) the trunk; return the metrics written to ``<out>/metrics.json``."""
    runtime = start_runtime(cfg.device, cfg.threads, cfg.amp)
    device, info, precision = runtime.device, runtime.info, runtime.precision
    dataset = PreparedDataset.load(cfg.root, cfg.dataset)
    _check(cfg, dataset)
    views = (RotationView(crop_size=cfg.crop_size) if cfg.method == "rotation"
             else ContrastiveViews(crop_size=cfg.crop_size, min_scale=cfg.min_scale))
    images = PretextImages(dataset, cfg.split, views)
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
    if state.step == 0 and info.is_main:
        state.extra["probe"] = {"random_init": run_probe(model.trunk, dataset, cfg, device, precision, workers)}
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
        export_backbone(spec.out_dir, model, cfg, len(images))
        state.extra.setdefault("probe", {})["pretrained"] = run_probe(model.trunk, dataset, cfg, device, precision,
                                                                      workers)
        artifacts.write_metrics(spec.out_dir, _summary(cfg, state, finished))
    return _summary(cfg, state, finished)


# --------------------------------------------------------------------------- command line


@click.command(short_help="Self-supervised pretraining of the backbone on the split's images.")
@options.root_option()
@options.dataset_option()
@options.split_option("train", "Split whose images are used (their labels never are).")
@click.option("--probe-split", default="val", show_default=True,
              help="Split on which the linear probe is scored (fitted on --split); 'none' skips the probe.")
@options.out_option("Output folder for backbone.pth, last.pth, config.json and metrics.json.")
@click.option("--backbone", type=click.Choice(sorted(BACKBONES)), default="resnet50", show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="contrastive", show_default=True,
              help="contrastive: SimCLR (MoCo v2 with --queue); rotation: 4-way rotation prediction.")
@click.option("--crop-size", type=click.IntRange(min=16), default=224, show_default=True)
@click.option("--min-scale", type=options.FiniteFloat(0, 1, min_open=True), default=0.08, show_default=True,
              help="Smallest area fraction of the random resized crop (contrastive views).")
@click.option("--batch-size", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--stop-after", type=click.IntRange(min=1), default=None,
              help="Stop after this epoch (the schedule still spans --epochs); continue later with --resume.")
@click.option("--lr", type=options.FiniteFloat(0, min_open=True), default=0.3, show_default=True,
              help="Peak learning rate (SGD, cosine schedule after a linear warm-up).")
@click.option("--weight-decay", type=options.FiniteFloat(0), default=1e-4, show_default=True)
@click.option("--momentum", type=options.FiniteFloat(0, 1, max_open=True), default=0.9, show_default=True)
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--temperature", type=options.FiniteFloat(0, min_open=True), default=0.2, show_default=True,
              help="NT-Xent / InfoNCE temperature.")
@click.option("--queue", type=click.IntRange(min=0), default=0, show_default=True,
              help="MoCo v2 queue of negative keys (0 = SimCLR, negatives from the batch).")
@click.option("--key-momentum", type=options.FiniteFloat(0, 1, max_open=True), default=0.99, show_default=True,
              help="With --queue: momentum of the key encoder.")
@click.option("--key-splits", type=click.IntRange(min=1), default=4, show_default=True,
              help="With --queue: BatchNorm of the keys on this many shuffled sub-batches (shuffle BN).")
@click.option("--probe-size", type=click.IntRange(min=16), default=None,
              help="Resize images to SIZE x SIZE for the probe's features (default: their own size).")
@options.amp_option
@options.device_option
@options.seed_option
@options.workers_option
@options.threads_option
@options.overwrite_option
def command(root, dataset, split, probe_split, out_dir, backbone, method, crop_size, min_scale, batch_size, epochs,
            stop_after, lr, weight_decay, momentum, warmup_epochs, temperature, queue, key_momentum, key_splits,
            probe_size, amp, device, seed, workers, threads, overwrite):
    """Pretrain a ResNet trunk on unlabeled images (contrastive or rotation); writes OUT/backbone.pth."""
    cfg = PretrainConfig(root=root, out_dir=out_dir, dataset=dataset, split=split,
                         probe_split=None if probe_split.lower() == "none" else probe_split, backbone=backbone,
                         method=method, crop_size=crop_size, min_scale=min_scale, batch_size=batch_size,
                         epochs=epochs, stop_after=stop_after, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         warmup_epochs=warmup_epochs, temperature=temperature, queue=queue,
                         key_momentum=key_momentum, key_splits=key_splits, probe_size=probe_size, amp=amp,
                         device=device, seed=seed, workers=workers, threads=threads, overwrite=overwrite)
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
