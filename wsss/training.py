"""The training engine shared by every training stage (train-cls, train-seg, pretrain, train-aff).

A run is a sequence of optimiser steps ``0 .. total - 1`` cut into *rounds*: an epoch of
train-cls, ``--eval-every`` iterations of train-seg.  :func:`fit` trains one round, validates
(when the stage gives a validation function), updates the best record, writes ``last.pth``
(and ``best.pth``) and ``metrics.json``, and goes on with the next round.

Data and determinism.  :class:`StepBatchSampler` cuts an endless stream of shuffled epochs into
batches: step ``i`` takes stream positions ``i*B .. i*B + B - 1`` and every item carries a seed
derived from ``(seed, rank, position)`` for its augmentation (:class:`SeededItems`).  Before each
step the global torch generator is re-seeded from ``(seed, rank, step)`` for the randomness inside
the step (dropout, the equivariance view, erasing).  So what step ``i`` sees depends only on the
seed, the rank and ``i``: a run stopped after any round and resumed from ``last.pth`` ends with
the same weights as an uninterrupted one (same device, same settings).

Precision.  ``--amp auto|bf16|fp16|off`` (:func:`resolve_precision`): ``auto`` is bfloat16 on a
CUDA device that supports it and full precision on the CPU; fp16 uses a gradient scaler.  On CUDA
the model and its inputs use the channels-last memory layout.

Device synchronisation.  Loss terms are summed on the device (:class:`LossMeter`) and read back
-- one synchronisation -- every ``log_every`` steps and at the end of each round; that read also
reports a non-finite loss, which stops training with a :class:`~wsss.errors.WsssError` naming the
first bad step, before any checkpoint with non-finite weights is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from wsss import artifacts
from wsss.device import AMP_MODES, DistInfo, derive_seed, loader_worker_init, stop_loader_workers, sum_over_ranks
from wsss.errors import WsssError
from wsss.progress import bar as progress_bar
from wsss.settings import field_default, option_for

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class Precision:
    """How a model runs: autocast dtype (None = full precision), gradient scaler, memory layout."""

    dtype: torch.dtype | None = None
    scaler: bool = False
    channels_last: bool = False

    @property
    def name(self) -> str:
        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self, device: torch.device):
        """A context manager running its body in this precision on ``device``."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def images(self, tensor: torch.Tensor) -> torch.Tensor:
        """An image batch [B, 3, H, W] in the memory layout the model expects."""
        return tensor.contiguous(memory_format=torch.channels_last) if self.channels_last else tensor

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` (in place) with its weights in the memory layout of :meth:`images`: a channels-last
        input with contiguous weights makes every convolution convert its weight at each call."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """Turn ``--amp`` into a :class:`Precision` for ``device``.

    ``auto``: bfloat16 on CUDA devices that support it (Ampere and newer), full precision
    elsewhere (CPU autocast is slower than float32 for convolutions on most CPUs).
    ``fp16`` adds a gradient scaler (its 5-bit exponent underflows small gradients).
    Channels-last memory is used on CUDA, where cuDNN's fastest kernels want it.
    """
    if amp not in AMP_MODES:
        raise WsssError(f"--amp {amp!r}: choose from {', '.join(AMP_MODES)}")
    cuda = device.type == "cuda"
    if amp == "auto":
        amp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "off"
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return Precision(dtype=dtype, scaler=dtype is torch.float16, channels_last=cuda)


@dataclass(frozen=True)
class Runtime:
    """Where and how a stage runs its networks: device, torchrun process info, precision."""

    device: torch.device
    info: DistInfo
    precision: Precision


def start_runtime(device: str, threads: int | None, amp: str) -> Runtime:
    """The set-up of every stage that runs a network, in one place: resolve ``--device``, join the
    torchrun group when there is one, apply the thread policy (``--threads``) and ``--amp``."""
    from wsss.device import configure_threads, init_distributed, resolve_device

    resolved = resolve_device(device)
    info = init_distributed(resolved)
    configure_threads(threads)
    return Runtime(resolved, info, resolve_precision(amp, resolved))


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 (disabled, it passes losses and steps through)."""
    return torch.amp.GradScaler(device.type, enabled=precision.scaler)


def maybe_compile(model: Callable, enabled: bool) -> Callable:
    """``torch.compile(model)`` (a module or a function) when ``enabled`` (``--compile``), else ``model``.

    Checkpoints are always written from the uncompiled module, so their keys do not change.
    """
    if not enabled:
        return model
    try:
        return torch.compile(model)
    except Exception as err:  # no compiler tool chain, unsupported platform
        raise WsssError(f"--compile: torch.compile is not available here ({type(err).__name__}: {err})") from None


# --------------------------------------------------------------------------- data


class SeededItems(Dataset):
    """Item ``(index, seed)``: the base dataset's item ``index`` with Python's ``random`` seeded to ``seed``.

    The joint transforms (:mod:`wsss.transforms`) draw from ``random``; seeding it per item makes
    an item's augmentation independent of the DataLoader worker count and of resuming.
    """

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        import random

        index, seed = key
        random.seed(seed)
        return self.base[index]


class StepBatchSampler:
    """Batches for steps ``start .. stop - 1`` cut from a stream of shuffled epochs.

    Position ``p`` of this rank's stream is item ``p % n`` of epoch ``p // n``, where an epoch
    is this rank's share of a :class:`DistributedSampler` permutation (``n`` items, padded so
    that every rank gets the same count).  Step ``i`` takes positions ``i*B .. i*B + B - 1``,
    so batches are always full (BatchNorm needs more than one sample) and depend only on
    ``(seed, rank, i)``.  Each entry is ``(dataset index, augmentation seed)``.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, info: DistInfo, start: int, stop: int):
        self.sampler = DistributedSampler(range(num_items), num_replicas=info.world_size, rank=info.rank,
                                          shuffle=True, seed=seed, drop_last=False)
        self.batch_size, self.seed, self.rank = batch_size, seed, info.rank
        self.start, self.stop = start, stop
        self._epoch, self._order = None, []

    @property
    def items_per_rank(self) -> int:
        """Items in one epoch of this rank's stream."""
        return len(self.sampler)

    def _indices(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, list(self.sampler)
        return self._order

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        per_epoch = len(self.sampler)
        for step in range(self.start, self.stop):
            batch = []
            for position in range(step * self.batch_size, (step + 1) * self.batch_size):
                epoch, offset = divmod(position, per_epoch)
                batch.append((self._indices(epoch)[offset], derive_seed(self.seed, self.rank, position)))
            yield batch


def step_loader(dataset: Dataset, batch_size: int, seed: int, info: DistInfo, start: int, stop: int,
                workers: int, device: torch.device) -> DataLoader:
    """A DataLoader over :class:`SeededItems` of ``dataset`` for steps ``start .. stop - 1``."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, info, start, stop)
    return DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", worker_init_fn=loader_worker_init)


def steps_per_epoch(num_items: int, batch_size: int, world_size: int) -> int:
    """Optimiser steps that show every item of one rank's share once (at least 1)."""
    return max(1, math.ceil(num_items / world_size) // batch_size)


# --------------------------------------------------------------------------- losses on the device


class LossMeter:
    """Sums of named loss terms kept on the device; :meth:`read` synchronises once.

    Also remembers, on the device, the first step whose ``total`` was not finite.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def add(self, terms: dict[str, torch.Tensor], step: int) -> None:
        """Accumulate one step's terms (scalar tensors; ``total`` must be among them)."""
        for name, value in terms.items():
            value = value.detach().float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        bad = ~torch.isfinite(terms["total"].detach())
        # a Python number, not a new device tensor: copying one to the GPU would wait for the step
        self._first_bad.masked_fill_(bad & (self._first_bad < 0), step)
        self._count += 1

    def read(self, info: DistInfo) -> dict[str, float]:
        """Mean of every term since the last read, averaged over ranks (one sync); then reset.

        Raises:
            WsssError: a loss was NaN or infinite (naming the first such step of this rank).
        """
        names = sorted(self._sums)
        if not names:
            return {}
        local_bad = self._first_bad.clone()
        values = torch.stack([self._sums[name] / self._count for name in names]
                             + [(local_bad >= 0).float()]).double()
        reduced = sum_over_ranks(values, info, self.device)
        self._sums, self._count = {}, 0
        self._first_bad.fill_(-1)
        _stop_if_bad(reduced[-1] > 0, local_bad)
        return {name: value / info.world_size for name, value in zip(names, reduced[:-1])}

    def pending(self, info: DistInfo) -> dict:
        """The sums not read yet, of every rank (one sync), for a checkpoint written inside a round.

        Returns:
            ``{"count", "names", "sums": [[sum of each name] per rank]}``, JSON types; the float32
            sums survive the round trip exactly, so a resumed run records the same losses.

        Raises:
            WsssError: a loss was NaN or infinite (as :meth:`read`).
        """
        names = sorted(self._sums)
        local = torch.zeros(info.world_size, len(names) + 1, dtype=torch.float64, device=self.device)
        if names:
            local[info.rank, :-1] = torch.stack([self._sums[name] for name in names]).double()
        local[info.rank, -1] = (self._first_bad >= 0).double()
        gathered = torch.tensor(sum_over_ranks(local.flatten(), info, self.device)).view(info.world_size, -1)
        _stop_if_bad(bool(gathered[:, -1].sum() > 0), self._first_bad.clone())
        return {"count": self._count, "names": names, "sums": gathered[:, :-1].tolist()}

    def restore(self, pending: dict | None, info: DistInfo) -> None:
        """Continue the sums of :meth:`pending` (a run resumed inside a round)."""
        if not pending or not pending.get("count"):
            return
        if len(pending["sums"]) != info.world_size:
            log.warning("resumed with %d processes instead of %d: the loss record of this round starts afresh",
                        info.world_size, len(pending["sums"]))
            return
        self._sums = {name: torch.tensor(value, dtype=torch.float32, device=self.device)
                      for name, value in zip(pending["names"], pending["sums"][info.rank])}
        self._count = int(pending["count"])


def _stop_if_bad(bad: bool, local_bad: torch.Tensor) -> None:
    if bad:
        where = int(local_bad) if int(local_bad) >= 0 else None
        raise WsssError(f"training stopped: the loss became NaN or infinite "
                        f"{f'at step {where}' if where is not None else 'on another process'}; "
                        "lower --lr (or use --amp off / --amp bf16 instead of fp16); "
                        "the last checkpoint is kept")


# --------------------------------------------------------------------------- state and checkpoints


@dataclass
class TrainState:
    """Everything about a run's progress that goes into its checkpoints (JSON types only).

    Attributes:
        step: optimiser steps done.
        round: rounds done (epochs of train-cls, evaluation rounds of train-seg).
        history: one record per round and per log interval.
        best: ``{"round", "step", "metric", "value"}`` of the round saved as ``best.pth``.
        seconds: training time so far (wall clock, summed over resumed runs).
        extra: stage-specific results (e.g. the last validation's per-class scores).
        pending: loss sums of a round stopped in the middle (``--stop-at``), see
            :meth:`LossMeter.pending`; the resumed run goes on from them, so its history is that
            of an uninterrupted run.
    """

    step: int = 0
    round: int = 0
    history: list = field(default_factory=list)
    best: dict | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    pending: dict | None = None


def plain_config(config: Any) -> dict:
    """A stage config as JSON types only (checkpoints are loaded with ``weights_only=True``)."""
    return json.loads(json.dumps(artifacts.jsonable(config), default=str))


@dataclass
class RunSpec:
    """What a stage tells the engine about its run: output folder, identity and schedule.

    Attributes:
        out_dir: the stage's output folder (``last.pth``, ``best.pth``, metrics).
        config: the stage's frozen config dataclass.
        schedule_fields: config fields that define the optimisation; a checkpoint resumes only
            when they agree.
        total_steps: optimiser steps of the whole schedule.
        classes, arch: stored in every checkpoint (the arch rebuilds the network).
        overwrite: start again even if ``last.pth`` exists.
    """

    out_dir: Path
    config: Any
    schedule_fields: Sequence[str]
    total_steps: int
    classes: list[str]
    arch: dict
    overwrite: bool = False

    def last(self) -> Path:
        return artifacts.checkpoint_path(self.out_dir, "last")


def find_resumable(spec: RunSpec) -> dict | None:
    """The run's ``last.pth`` to resume from, or None to start fresh.

    Raises:
        WsssError: ``last.pth`` was made with a different schedule (naming the options).
    """
    path = spec.last()
    if spec.overwrite or not path.is_file():
        return None
    checkpoint = artifacts.load_checkpoint(path)
    saved, current = checkpoint.get("config", {}), plain_config(spec.config)
    # an option added after the checkpoint was written counts as its default
    defaults = {f.name: field_default(f) for f in dataclasses.fields(spec.config)}
    defaults = plain_config({name: value for name, value in defaults.items() if value is not dataclasses.MISSING})
    changed = []
    for name in spec.schedule_fields:
        before, now = saved.get(name, defaults.get(name)), current.get(name)
        if isinstance(now, dict):  # a group of options (SGD): name the ones that changed
            # a checkpoint from before the group existed holds its keys at the top level; a key added to the
            # group since counts as its default
            before = {**defaults.get(name, {}), **{key: saved[key] for key in now if key in saved},
                      **(before if isinstance(before, dict) and name in saved else {})}
            changed += [option_for(spec.config, key, group=name) for key in now if before.get(key) != now[key]]
        elif before != now:
            changed.append(option_for(spec.config, name))
    if checkpoint.get("total_steps", spec.total_steps) != spec.total_steps:
        changed.append(f"total steps ({checkpoint.get('total_steps')} -> {spec.total_steps})")
    if changed:
        raise WsssError(f"{path}: cannot resume, the run used different {', '.join(changed)}; "
                        "pass --overwrite to start again")
    return checkpoint


@dataclass
class Trainee:
    """The trainable pieces of a run: the (unwrapped) model, its optimiser, schedule and scaler."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler

    def restore(self, checkpoint: dict) -> TrainState:
        """Load weights and optimiser state from a checkpoint; return its :class:`TrainState`."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        return TrainState(**{f.name: checkpoint[f.name] for f in dataclasses.fields(TrainState)
                             if f.name in checkpoint})

    def save(self, path: Path, spec: RunSpec, state: TrainState) -> None:
        """Write a checkpoint dict (see :mod:`wsss.artifacts`) atomically."""
        artifacts.save_checkpoint(path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "config": plain_config(spec.config), "classes": list(spec.classes), "arch": spec.arch,
            "total_steps": spec.total_steps, **dataclasses.asdict(state),
        })


def finished_metrics(spec: RunSpec, checkpoint: dict | None) -> dict | None:
    """The metrics of a run that already finished (nothing to train), else None."""
    metrics_file = artifacts.metrics_path(spec.out_dir)
    if checkpoint is None or checkpoint.get("step", 0) < spec.total_steps or not metrics_file.is_file():
        return None
    log.info("%s: training already finished (%d steps); pass --overwrite to train again", spec.last(),
             spec.total_steps)
    return artifacts.read_json(metrics_file, expect=dict)


def wrap_distributed(module: torch.nn.Module, device: torch.device, info: DistInfo,
                     sync_batchnorm: bool = False) -> torch.nn.Module:
    """The module to train with: itself in one process, DistributedDataParallel under torchrun."""
    if not info.distributed:
        return module
    if sync_batchnorm and device.type == "cuda":
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


# --------------------------------------------------------------------------- the loop


StepLoss = Callable[[Any, int], dict]
Validate = Callable[[], dict]


@dataclass
class Loop:
    """How :func:`fit` trains: one call of ``step_loss(batch, step)`` per step (``step`` counts from 0
    over the whole schedule, so a loss can ramp a term in) returns scalar loss terms
    (``{"total": ..., ...}``); rounds of ``round_steps``; a loss record every ``log_every`` steps.

    Attributes:
        select: the key of a validation record that picks ``best.pth`` (higher is better);
            None, or a record without it, makes every round the best (best = last).
        stop_at: stop after the round that reaches this step (the schedule still spans
            ``total_steps``); continue later by running again.
        summarize: ``(state, finished) -> dict`` written as ``metrics.json`` after every round.
    """

    step_loss: StepLoss
    round_steps: int
    summarize: Callable[[TrainState, bool], dict]
    validate: Validate | None = None
    select: str | None = None
    log_every: int | None = None
    stop_at: int | None = None
    desc: str = "train"
    seed: int = 0


def _is_better(record: dict, select: str | None, best: dict | None) -> bool:
    value = record.get(select) if select else None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return True  # nothing to compare by: the newest round is kept
    return best is None or best.get("value") is None or value > best["value"]


def fit(trainee: Trainee, loader: Iterable, loop: Loop, spec: RunSpec, state: TrainState, *,
        precision: Precision, device: torch.device, info: DistInfo) -> TrainState:
    """Train from ``state.step`` to the end of the schedule (or ``loop.stop_at``), round by round.

    Args:
        trainee: model (unwrapped), optimiser, scheduler, scaler; ``loop.step_loss`` runs the
            (possibly DDP-wrapped) model itself.
        loader: batches for steps ``state.step .. stop - 1`` (see :func:`step_loader`).
        loop: the per-step loss, round length, validation and best selection.
        spec: output folder and checkpoint identity.
        state: the progress so far (fresh or restored); updated in place and returned.

    Returns:
        The final :class:`TrainState`.
    """
    stop = spec.total_steps if loop.stop_at is None else min(loop.stop_at, spec.total_steps)
    meter = LossMeter(device)
    meter.restore(state.pending, info)
    state.pending = None
    started = time.perf_counter() - state.seconds
    batches = iter(loader)
    progress = progress_bar(total=stop, initial=state.step, desc=loop.desc, unit="step", show=info.is_main)
    try:
        _rounds(trainee, batches, loop, spec, state, meter, stop, started, progress, precision=precision,
                device=device, info=info)
    finally:
        stop_loader_workers(batches)
        progress.close()
    return state


def _rounds(trainee: Trainee, batches, loop: Loop, spec: RunSpec, state: TrainState, meter: LossMeter, stop: int,
            started: float, progress, *, precision: Precision, device: torch.device, info: DistInfo) -> None:
    """The rounds of :func:`fit` from ``state.step`` to ``stop``."""
    while state.step < stop:
        natural_end = min(spec.total_steps, (state.step // loop.round_steps + 1) * loop.round_steps)
        round_end = min(stop, natural_end)
        trainee.model.train()
        for batch in itertools.islice(batches, round_end - state.step):
            # randomness inside the step (dropout, random views) depends only on (seed, rank, step)
            torch.manual_seed(derive_seed(loop.seed, info.rank, state.step))
            with precision.autocast(device):
                terms = loop.step_loss(batch, state.step)
            trainee.optimizer.zero_grad(set_to_none=True)
            trainee.scaler.scale(terms["total"]).backward()
            trainee.scaler.step(trainee.optimizer)
            trainee.scaler.update()
            trainee.scheduler.step()
            meter.add(terms, state.step)
            state.step += 1
            progress.update(1)
            if loop.log_every and state.step % loop.log_every == 0 and state.step < natural_end:
                state.history.append({"step": state.step, **_loss_record(meter.read(info), trainee)})
        if state.step < round_end:  # a loader shorter than the schedule would loop here for ever
            raise RuntimeError(f"{loop.desc}: the batches ran out at step {state.step}, before step {round_end}")
        if round_end < natural_end:
            _stop_inside_round(trainee, loop, spec, state, meter.pending(info), started, info)
            break
        record = {"round": state.round + 1, "step": state.step, **_loss_record(meter.read(info), trainee)}
        state.round += 1
        if loop.validate is not None:
            record.update(loop.validate())
        state.history.append(record)
        state.seconds = time.perf_counter() - started
        if info.is_main:
            if _is_better(record, loop.select, state.best):
                state.best = {"round": state.round, "step": state.step, "metric": loop.select,
                              "value": record.get(loop.select) if loop.select else None}
                trainee.save(artifacts.checkpoint_path(spec.out_dir, "best"), spec, state)
            trainee.save(spec.last(), spec, state)
            artifacts.write_metrics(spec.out_dir, loop.summarize(state, state.step >= spec.total_steps))
            log.info("%s: step %d/%d, %s", loop.desc, state.step, spec.total_steps, _brief(record))
        if info.distributed:
            torch.distributed.barrier()


def _stop_inside_round(trainee: Trainee, loop: Loop, spec: RunSpec, state: TrainState, pending: dict,
                       started: float, info: DistInfo) -> None:
    """Checkpoint a run stopped inside a round (``stop_at``): no validation and no round record;
    the loss sums so far go into the checkpoint, so the resumed round is recorded as if never stopped."""
    state.pending = pending
    state.seconds = time.perf_counter() - started
    if info.is_main:
        if loop.select is None:  # best = last: keep the promise also for a stopped run
            state.best = {"round": state.round, "step": state.step, "metric": None, "value": None}
            trainee.save(artifacts.checkpoint_path(spec.out_dir, "best"), spec, state)
        trainee.save(spec.last(), spec, state)
        artifacts.write_metrics(spec.out_dir, loop.summarize(state, False))
        log.info("%s: stopped at step %d/%d (inside a round); run again to continue", loop.desc, state.step,
                 spec.total_steps)
    if info.distributed:
        torch.distributed.barrier()


# step terms that are measurements, not loss terms (recorded under their own name)
MEASUREMENTS = ("accuracy",)


def _loss_record(means: dict[str, float], trainee: Trainee) -> dict:
    def key(name: str) -> str:
        return "loss" if name == "total" else name if name in MEASUREMENTS else f"loss_{name}"
    return {**{key(name): value for name, value in means.items()}, "lr": trainee.optimizer.param_groups[0]["lr"]}


def _brief(record: dict) -> str:
    keys = [key for key in record if key.startswith("loss") or key.startswith("val_") or key in MEASUREMENTS]
    return ", ".join(f"{key} {record[key]:.4f}" for key in keys if isinstance(record[key], float))
