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
from typing import TYPE_CHECKING

import click
from wsss.stages.options import (amp_setting, compile_setting, dataset_setting, device_setting, folder_problem,
                                 loader_workers_setting, overwrite_setting, pair_problem, positive_pair, root_setting,
                                 seed_setting, settings_command, threads_setting)
from wsss import artifacts
from wsss.cam_choices import ER_TARGETS, ERASE_CLASSES, ERASE_FILLS, ERASE_STOP, ERASE_THRESH, SHOWN_SCORE
from wsss.datasets.prepared import PreparedDataset
from wsss.device import default_workers, dist_info, seed_everything
from wsss.errors import WsssError
from wsss.models import BACKBONE_NAMES, OUTPUT_STRIDES, POOLINGS
from wsss.optim import Sgd, sgd_group
from wsss.settings import Settings, setting

if TYPE_CHECKING:
    from wsss.training import TrainState

log = logging.getLogger(__name__)

# Options that define the optimisation; a checkpoint can only be resumed when they agree.
SCHEDULE_FIELDS = ("split", "backbone", "output_stride", "pooling", "lse_r", "freeze_bn", "crop_size", "scale_range",
                   "jitter", "batch_size", "epochs", "sgd",
                   "er_weight", "er_scale_range", "er_min_crop", "er_target", "er_view_cls", "er_view_stop",
                   "erase_weight", "erase_thresh", "erase_fill", "erase_classes", "erase_stop", "reg_start", "reg_ramp",
                   "seed", "amp")
# --select: the val metric that picks best.pth (named as train-seg's val-miou), or the last epoch
SELECT_METRICS = {"val-map": "val_map", "val-cam-miou": "val_cam_miou", "last": None}
# the names before they matched train-seg's, which config.json files of earlier runs hold
_EARLIER_SELECT = {"map": "val-map", "cam-miou": "val-cam-miou"}


@dataclass(frozen=True)
class TrainClsConfig(Settings):
    """Options of ``wsss train-cls`` (see ``wsss train-cls --help``); defaults follow IRN/SEAM."""

    root: Path = root_setting()
    out_dir: Path = setting(help="Output folder for last.pth, best.pth, config.json and metrics.json.", option="--out",
                            validate=folder_problem)
    dataset: str | None = dataset_setting()
    split: str = setting("train", "Training split.")
    val_split: str | None = setting("val", "Split for the per-epoch mAP (and CAM mIoU where it has masks); none "
                                           "disables validation.")
    backbone: str = setting("resnet50", "Classifier trunk (torchvision ResNet).", choices=tuple(sorted(BACKBONE_NAMES)))
    weights: str = setting("imagenet", "Backbone initialisation: imagenet (torchvision download), none, or a "
                                       "state_dict file PATH (e.g. `wsss pretrain`'s backbone.pth).")
    output_stride: int = setting(16, "Input pixels per CAM cell: 16 dilates the last stage (IRN), 8 the last two "
                                     "(SEAM's ResNet-38 setting: 4x the cells, about 3x the compute).",
                                 choices=OUTPUT_STRIDES)
    pooling: str = setting("gap", "How class maps become logits: gap, their mean (CAM, IRN, SEAM); lse, "
                                  "log-sum-exp (Pinheiro & Collobert) with sharpness --lse-r.", choices=POOLINGS)
    lse_r: float = setting(5.0, "Sharpness r of --pooling lse: (1/r) log mean exp(r x); small r is the mean, large "
                                "r the maximum (below 0.1 rounding swamps the difference to the mean).", at_least=0.1)
    freeze_bn: bool = setting(False, "Keep BatchNorm in eval mode with frozen parameters (small batches).")
    crop_size: int = setting(512, "Side of the square training crop, in pixels.", at_least=16)
    scale_range: tuple[float, float] = setting((0.5, 1.5), "MIN,MAX random rescale factors before cropping.",
                                               above=0, parse=positive_pair, validate=pair_problem)
    jitter: bool = setting(True, "Colour jitter of the training images.")
    batch_size: int = setting(16, "Images per optimiser step and process.", at_least=1)
    epochs: int = setting(5, "Epochs of the schedule (passes over --split).", at_least=1)
    stop_after: int | None = setting(None, "Stop after this epoch (the schedule still spans --epochs); continue "
                                           "later with --resume.", at_least=1)
    sgd: Sgd = sgd_group(lr=0.1)
    er_weight: float = setting(0.0, "Weight of the equivariance regularisation (SEAM; its paper uses 1); 0 "
                                    "disables it.", at_least=0)
    er_scale_range: tuple[float, float] = setting((0.3, 0.7), "MIN,MAX rescale factor of the equivariance view "
                                                              "(also flipped at random).", above=0,
                                                  parse=positive_pair, validate=pair_problem)
    er_min_crop: float = setting(1.0, "The equivariance view is a random window of this..1 of each image side "
                                      "(1 = whole image, as SEAM); a translation.", above=0, at_most=1)
    er_target: str = setting("detached", "detached: the image's CAMs are the target of the view's (no gradient "
                                         "into them); both: the gradient reaches both branches (SEAM).",
                             choices=ER_TARGETS)
    er_view_cls: bool = setting(True, "Also classify the equivariance view (SEAM classifies both branches).")
    er_view_stop: float = setting(SHOWN_SCORE, "Leave out of the view's classification a class scored >= this "
                                               "on the image but below it on the view (a view too small for a "
                                               "small part no longer shows a class told by it); 0 keeps every "
                                               "class.", at_least=0, at_most=1)
    erase_weight: float = setting(0.0, "Weight of the adversarial-erasing classification loss; 0 disables it.",
                                  at_least=0)
    erase_thresh: float = setting(ERASE_THRESH, "Erase pixels whose CAM is >= this fraction of the class maximum.",
                                  above=0, at_most=1)
    erase_fill: str = setting("blur", "What replaces erased pixels: a blurred copy of the image (no sharp flat "
                                      "patch to learn as a cue) or the mean colour.", choices=ERASE_FILLS)
    erase_classes: str = setting("all", "Erase the regions of every present class, or of one random present class "
                                        "per image.", choices=ERASE_CLASSES)
    erase_stop: float = setting(ERASE_STOP, "Leave out of the erasing loss a class scored >= this on the image "
                                           "but below it on the erased image (its evidence was erased: "
                                           "adversarial erasing's stopping rule, e.g. 0.5); 0 keeps every class.",
                                at_least=0, at_most=1)
    reg_start: float = setting(0.0, "Fraction of the schedule before equivariance and erasing start.",
                               at_least=0, at_most=1)
    reg_ramp: float = setting(0.0, "Fraction of the schedule over which they then rise linearly to full weight.",
                              at_least=0, at_most=1)
    val_cam_images: int = setting(100, "Validation images (first N of --val-split) scored for CAM mIoU each epoch.",
                                  at_least=0)
    val_cam_threshold: float = setting(0.15, "Background threshold of the per-epoch CAM mIoU.", at_least=0,
                                       at_most=1)
    select: str = setting("val-map", "What picks best.pth: the best val mAP (image-level labels only), the best val "
                                     "CAM mIoU (uses the val masks), or the last epoch.",
                          choices=tuple(SELECT_METRICS), parse=lambda text: _EARLIER_SELECT.get(text, text))
    amp: str = amp_setting()
    compile_model: bool = compile_setting()
    device: str = device_setting()
    seed: int = seed_setting()
    workers: int | None = loader_workers_setting()
    threads: int | None = threads_setting()
    overwrite: bool = overwrite_setting()


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
    # the network and torch are imported here, not at the top, so that `wsss train-cls --help` does not load them
    from wsss.datasets.torch_data import ClassificationDataset
    from wsss.inference import validate_classifier
    from wsss.losses import CamObjective, regulariser_ramp
    from wsss.models.classifier import CamNet, classifier_arch
    from wsss.training import (Loop, RunSpec, Trainee, TrainState, find_resumable, finished_metrics, fit,
                               grad_scaler, maybe_compile, start_runtime, step_loader, steps_per_epoch,
                               wrap_distributed)
    from wsss.transforms import train_preset

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
    optimizer = cfg.sgd.optimizer(*model.parameter_groups())
    trainee = Trainee(model, optimizer, cfg.sgd.scheduler(optimizer, spec.total_steps), grad_scaler(precision, device))
    state = trainee.restore(checkpoint) if checkpoint else TrainState()
    if info.is_main:
        artifacts.write_config(spec.out_dir, cfg, arch=arch, classes=dataset.classes, num_train_images=len(train_set),
                               steps_per_epoch=per_epoch, world_size=info.world_size, device=str(device),
                               precision=precision.name)
    objective = maybe_compile(wrap_distributed(CamObjective(
        model, er_weight=cfg.er_weight, er_scale_range=cfg.er_scale_range, er_min_crop=cfg.er_min_crop,
        er_target=cfg.er_target, er_view_cls=cfg.er_view_cls, er_view_stop=cfg.er_view_stop,
        erase_weight=cfg.erase_weight, erase_thresh=cfg.erase_thresh, erase_fill=cfg.erase_fill,
        erase_classes=cfg.erase_classes, erase_stop=cfg.erase_stop), device, info),
        cfg.compile_model)
    workers = min(default_workers(), 4) if cfg.workers is None else cfg.workers

    def step_loss(batch, step):
        images, targets = (tensor.to(device, non_blocking=True) for tensor in batch)
        ramp = regulariser_ramp(step, spec.total_steps, cfg.reg_start, cfg.reg_ramp)
        return objective(precision.images(images), targets, ramp)

    def validation() -> dict:
        return validate_classifier(model, dataset, val_split, device, info, precision=precision,
                                   cam_images=cfg.val_cam_images, cam_threshold=cfg.val_cam_threshold, workers=workers)

    stop = spec.total_steps if cfg.stop_after is None else min(spec.total_steps, cfg.stop_after * per_epoch)
    loop = Loop(step_loss, round_steps=per_epoch, summarize=lambda s, done: _summary(cfg, s, done),
                validate=validation if val_split else None, select=SELECT_METRICS[cfg.select], stop_at=stop,
                desc="train-cls", seed=cfg.seed)
    loader = step_loader(train_set, batch_size, cfg.seed, info, state.step, stop, workers, device)
    state = fit(trainee, loader, loop, spec, state, precision=precision, device=device, info=info)
    return _summary(cfg, state, state.step >= spec.total_steps)


# --------------------------------------------------------------------------- command line


@settings_command(TrainClsConfig, name="train-cls")
def command(cfg: TrainClsConfig) -> None:
    """Train a ResNet CAM classifier on image-level labels (equivariance and erasing optional).

    Writes OUT/last.pth, OUT/best.pth, OUT/config.json and OUT/metrics.json; an
    existing OUT/last.pth is resumed unless --overwrite is given.
    """
    metrics = run(cfg)
    if not dist_info().is_main:
        return
    best = metrics.get("best") or {}
    line = f"trained {metrics['epoch']}/{cfg.epochs} epochs"
    if best.get("value") is not None:
        line += f"; best {best['metric']} {best['value']:.4f} (epoch {best['round']})"
    click.echo(line)
