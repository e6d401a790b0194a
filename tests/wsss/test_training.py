"""The shared training engine: step sampler, loss meter, precision, checkpoints and resume checks."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from wsss import artifacts
from wsss.device import DistInfo
from wsss.errors import WsssError
from wsss.training import (LossMeter, Loop, RunSpec, StepBatchSampler, Trainee, TrainState, find_resumable, fit,
                           grad_scaler, resolve_precision, steps_per_epoch)


def test_step_sampler_is_full_deterministic_and_resumable():
    full = list(StepBatchSampler(5, 2, seed=7, info=DistInfo(), start=0, stop=6))
    assert all(len(batch) == 2 for batch in full)
    indices = [index for batch in full for index, _ in batch]
    assert sorted(indices[:5]) == list(range(5)) and sorted(indices[5:10]) == list(range(5))  # epochs without repeats
    assert list(StepBatchSampler(5, 2, seed=7, info=DistInfo(), start=3, stop=6)) == full[3:]
    assert list(StepBatchSampler(5, 2, seed=8, info=DistInfo(), start=0, stop=6)) != full
    rank0 = StepBatchSampler(5, 2, seed=7, info=DistInfo(0, 0, 2), start=0, stop=1)
    rank1 = StepBatchSampler(5, 2, seed=7, info=DistInfo(1, 1, 2), start=0, stop=1)
    first = [i for i, _ in next(iter(rank0))] + [i for i, _ in next(iter(rank1))]
    assert len(set(first)) == 4  # the ranks see different images
    # every position gets its own augmentation seed
    seeds = [seed for batch in full for _, seed in batch]
    assert len(set(seeds)) == len(seeds)


def test_steps_per_epoch():
    assert steps_per_epoch(10, 4, 1) == 2
    assert steps_per_epoch(10, 4, 2) == 1  # 5 images per rank
    assert steps_per_epoch(3, 4, 1) == 1


def test_loss_meter_means_and_non_finite_stop():
    meter = LossMeter(torch.device("cpu"))
    meter.add({"total": torch.tensor(1.0), "cls": torch.tensor(0.5)}, step=0)
    meter.add({"total": torch.tensor(3.0), "cls": torch.tensor(1.5)}, step=1)
    assert meter.read(DistInfo()) == {"cls": 1.0, "total": 2.0}
    assert meter.read(DistInfo()) == {}  # reset after a read
    meter.add({"total": torch.tensor(1.0)}, step=4)
    meter.add({"total": torch.tensor(float("nan"))}, step=5)
    meter.add({"total": torch.tensor(float("inf"))}, step=6)
    with pytest.raises(WsssError, match="NaN or infinite at step 5"):
        meter.read(DistInfo())


def test_loss_meter_pending_sums_continue_exactly_after_a_resume():
    terms = [torch.tensor(value, dtype=torch.float32) for value in (0.1, 0.7, 1e-3)]
    straight = LossMeter(torch.device("cpu"))
    for step, value in enumerate(terms):
        straight.add({"total": value}, step)
    stopped = LossMeter(torch.device("cpu"))
    stopped.add({"total": terms[0]}, 0)
    stopped.add({"total": terms[1]}, 1)
    pending = stopped.pending(DistInfo())
    assert pending == {"count": 2, "names": ["total"], "sums": [[float(terms[0] + terms[1])]]}  # float32 sum
    resumed = LossMeter(torch.device("cpu"))
    resumed.restore(pending, DistInfo())
    resumed.add({"total": terms[2]}, 2)
    assert resumed.read(DistInfo()) == straight.read(DistInfo())  # bit for bit
    bad = LossMeter(torch.device("cpu"))
    bad.add({"total": torch.tensor(float("nan"))}, 3)
    with pytest.raises(WsssError, match="at step 3"):
        bad.pending(DistInfo())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_loss_meter_add_does_not_wait_for_the_gpu():
    cuda = torch.device("cuda")
    meter = LossMeter(cuda)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        for step in range(3):
            loss = torch.randn((), device=cuda)
            meter.add({"total": loss.exp(), "cls": loss}, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert meter.read(DistInfo())["total"] > 0


def test_precision_module_puts_weights_in_the_images_layout():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(5, 2))
    assert resolve_precision("off", torch.device("cpu")).module(net) is net
    assert net[0].weight.is_contiguous()
    last = dataclasses.replace(resolve_precision("off", torch.device("cpu")), channels_last=True)
    assert last.module(net) is net
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last) and not net[0].weight.is_contiguous()
    assert net[2].weight.is_contiguous()  # 2-D weights keep their layout


def test_precision_choices_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).dtype is None  # full precision on the CPU
    assert resolve_precision("bf16", cpu).dtype is torch.bfloat16 and not resolve_precision("bf16", cpu).scaler
    fp16 = resolve_precision("fp16", cpu)
    assert fp16.dtype is torch.float16 and fp16.scaler and not fp16.channels_last
    with pytest.raises(WsssError, match="--amp"):
        resolve_precision("fp8", cpu)
    with resolve_precision("bf16", cpu).autocast(cpu):
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype is torch.bfloat16


# --------------------------------------------------------------------------- fit and resume on a toy problem


@dataclass(frozen=True)
class ToyConfig:
    lr: float = 0.1
    seed: int = 0


def _toy(out: Path, total: int = 6, lr: float = 0.1):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
    trainee = Trainee(model, optimizer, scheduler, grad_scaler(resolve_precision("off", torch.device("cpu")),
                                                               torch.device("cpu")))
    spec = RunSpec(out, ToyConfig(lr=lr), ("lr", "seed"), total, ["background", "x"], {"kind": "toy"})
    data = torch.randn(total, 4, 3)

    def step_loss(batch, step):
        noise = torch.randn(4, 1)  # randomness inside the step comes from the per-step seed
        return {"total": ((model(batch) - noise) ** 2).mean()}

    return trainee, spec, data, step_loss


def _fit(out: Path, stop_at=None, total: int = 6, round_steps: int = 2, log_every: int | None = None):
    trainee, spec, data, step_loss = _toy(out, total)
    checkpoint = find_resumable(spec)
    state = trainee.restore(checkpoint) if checkpoint else TrainState()
    loop = Loop(step_loss, round_steps=round_steps, summarize=lambda s, done: {"finished": done, "step": s.step},
                stop_at=stop_at, seed=3, log_every=log_every)
    cpu = torch.device("cpu")
    fit(trainee, list(data[state.step:stop_at or total]), loop, spec, state,
        precision=resolve_precision("off", cpu), device=cpu, info=DistInfo())
    return trainee.model


def test_batches_that_end_before_the_schedule_are_an_error_not_an_endless_loop(tmp_path):
    trainee, spec, data, step_loss = _toy(tmp_path / "short", total=6)
    loop = Loop(step_loss, round_steps=2, summarize=lambda s, done: {"finished": done}, seed=3)
    cpu = torch.device("cpu")
    with pytest.raises(RuntimeError, match="the batches ran out at step 3, before step 4"):
        fit(trainee, list(data[:3]), loop, spec, TrainState(), precision=resolve_precision("off", cpu), device=cpu,
            info=DistInfo())


def test_fit_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    straight = _fit(tmp_path / "straight")
    _fit(tmp_path / "resumed", stop_at=2)
    halfway = artifacts.load_checkpoint(artifacts.checkpoint_path(tmp_path / "resumed", "last"))
    assert halfway["step"] == 2 and halfway["round"] == 1
    resumed = _fit(tmp_path / "resumed")
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    final = artifacts.load_checkpoint(artifacts.checkpoint_path(tmp_path / "resumed", "last"))
    assert final["step"] == 6 and final["round"] == 3 and final["total_steps"] == 6
    assert [record["step"] for record in final["history"]] == [2, 4, 6]
    assert artifacts.read_json(artifacts.metrics_path(tmp_path / "resumed")) == {"finished": True, "step": 6}


def test_a_run_stopped_inside_a_round_records_the_history_of_an_uninterrupted_one(tmp_path):
    # rounds of 4 steps, a loss record every 3: stopping at step 2 (and at 5) falls inside a round
    # and between records; the history used to gain a round record at the stop and lose the mean
    # of the steps before it
    _fit(tmp_path / "straight", total=8, round_steps=4, log_every=3)
    _fit(tmp_path / "stopped", total=8, round_steps=4, log_every=3, stop_at=2)
    halfway = artifacts.load_checkpoint(artifacts.checkpoint_path(tmp_path / "stopped", "last"))
    assert halfway["step"] == 2 and halfway["round"] == 0 and halfway["history"] == []
    assert halfway["pending"]["count"] == 2
    _fit(tmp_path / "stopped", total=8, round_steps=4, log_every=3, stop_at=5)
    _fit(tmp_path / "stopped", total=8, round_steps=4, log_every=3)
    history = {name: artifacts.load_checkpoint(artifacts.checkpoint_path(tmp_path / name, "last"))["history"]
               for name in ("straight", "stopped")}
    assert [(record.get("round"), record["step"]) for record in history["straight"]] == \
        [(None, 3), (1, 4), (None, 6), (2, 8)]
    assert history["stopped"] == history["straight"]
    final = artifacts.load_checkpoint(artifacts.checkpoint_path(tmp_path / "stopped", "best"))
    assert final["best"] == {"round": 2, "step": 8, "metric": None, "value": None} and final["pending"] is None


@pytest.mark.parametrize("select, best_round", [("val_miou", 2), (None, 3)])
def test_best_checkpoint_is_the_round_with_the_highest_selected_value(tmp_path, select, best_round):
    """train-seg's --select val-miou: best.pth is the round whose validation scored highest (0.5 of 0.2, 0.5, 0.3),
    with that round's weights; --select last (no key): the last round."""
    trainee, spec, data, step_loss = _toy(tmp_path / "run")
    scores = iter([0.2, 0.5, 0.3])
    loop = Loop(step_loss, round_steps=2, summarize=lambda state, done: {}, validate=lambda: {"val_miou": next(scores)},
                select=select, seed=3)
    cpu = torch.device("cpu")
    fit(trainee, list(data), loop, spec, TrainState(), precision=resolve_precision("off", cpu), device=cpu,
        info=DistInfo())
    best = artifacts.load_checkpoint(artifacts.checkpoint_path(tmp_path / "run", "best"))
    value = {"val_miou": [0.2, 0.5, 0.3][best_round - 1], None: None}[select]
    assert best["best"] == {"round": best_round, "step": 2 * best_round, "metric": select, "value": value}
    assert best["step"] == 2 * best_round
    after_that_round = _fit(tmp_path / "stopped", stop_at=2 * best_round)
    for name, tensor in after_that_round.state_dict().items():
        assert torch.equal(best["model"][name], tensor), name


def test_resume_refuses_another_schedule(tmp_path):
    _fit(tmp_path / "run", stop_at=2)
    trainee, spec, _, _ = _toy(tmp_path / "run", lr=0.2)
    with pytest.raises(WsssError, match="cannot resume, the run used different --lr"):
        find_resumable(spec)
    _, spec, _, _ = _toy(tmp_path / "run", total=8)
    with pytest.raises(WsssError, match=r"total steps \(6 -> 8\)"):
        find_resumable(spec)
    assert find_resumable(dataclasses.replace(spec, overwrite=True)) is None


def test_start_runtime_applies_threads():
    """Every stage that runs a network starts with start_runtime, which applies --threads."""
    from wsss.training import start_runtime

    before = torch.get_num_threads()
    try:
        runtime = start_runtime("cpu", 2, "off")
        assert torch.get_num_threads() == 2
        assert runtime.device == torch.device("cpu") and not runtime.info.distributed and runtime.precision.dtype is None
    finally:
        torch.set_num_threads(before)


def _why_torch_compile_cannot_run() -> str | None:
    """Why this platform has no compiler for ``torch.compile`` on the CPU, or None when it has one.

    The two things inductor needs before it compiles anything: TorchDynamo support for this Python and
    platform, and a C++ compiler (inductor's own search: ``CXX``, then g++ and the like).  Anything else that
    goes wrong while compiling, ``--compile``'s own WsssError included, is a failure, not a skip.
    """
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python or platform"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler
    except ImportError:  # an older torch: its compiler search is not importable, look for the usual names
        import shutil

        return None if any(shutil.which(name) for name in ("g++", "c++", "clang++")) else "no C++ compiler"
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler as err:
        return f"no C++ compiler for inductor ({err})"
    return None


def test_compile_does_not_change_results():
    """--compile (torch.compile) gives the eager network's outputs, also for a compiled bound method
    (make-cam compiles ``class_maps``); skipped only where this platform has no compiler."""
    from wsss.training import maybe_compile

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 4, 1))

        def class_maps(self, images):
            return self.body(images)

    torch.manual_seed(0)
    net = Tiny().eval()
    images = torch.randn(2, 3, 16, 20)
    assert maybe_compile(net.class_maps, False) == net.class_maps  # off: the function itself
    if (reason := _why_torch_compile_cannot_run()) is not None:
        pytest.skip(f"torch.compile cannot run here: {reason}")
    out = maybe_compile(net.class_maps, True)(images)
    torch.testing.assert_close(out, net.class_maps(images), rtol=1e-5, atol=1e-5)
    assert set(net.state_dict()) == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"}  # names kept


def test_resume_compares_a_group_with_a_checkpoint_written_before_the_group(tmp_path):
    """A checkpoint whose config holds the SGD keys at the top level (before ``sgd`` was a group) resumes with the
    same values and is refused with others, naming them; a group key it lacks counts as its default."""
    from wsss.optim import Sgd
    from wsss.settings import Settings, setting

    @dataclass(frozen=True)
    class Grouped(Settings):
        sgd: Sgd = setting(factory=lambda: Sgd(lr=0.1), prefix="")
        seed: int = 0

    out = tmp_path / "run"
    artifacts.save_checkpoint(artifacts.checkpoint_path(out, "last"), {
        "model": {}, "config": {"lr": 0.05, "poly_power": 0.5, "momentum": 0.9, "weight_decay": 1e-4, "seed": 0},
        "classes": ["background", "x"], "arch": {}, "step": 1, "total_steps": 4})

    def spec(**sgd):
        return RunSpec(out, Grouped(sgd=Sgd(**{"lr": 0.05, "poly_power": 0.5, **sgd})), ("sgd", "seed"), 4,
                       ["background", "x"], {})

    assert find_resumable(spec()) is not None  # head_lr_mult is missing there: its default, 10
    with pytest.raises(WsssError, match=r"different --lr, --poly-power"):
        find_resumable(spec(lr=0.1, poly_power=0.9))
    with pytest.raises(WsssError, match=r"different --head-lr-mult"):
        find_resumable(spec(head_lr_mult=1.0))


# --------------------------------------------------------------------------- two processes: DDP = one process


DDP_STEPS = 3


def _ddp_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step the global batch: 4 images [4, 3, 32, 32] and multi-hot targets [4, 2] (rank r takes 2r, 2r + 1)."""
    generator = torch.Generator().manual_seed(11)
    return [(torch.randn(4, 3, 32, 32, generator=generator),
             torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]]).roll(step, 0)) for step in range(DDP_STEPS)]


def _train_cam_net(out: Path, batches, info: DistInfo, train: bool = True) -> dict:
    """train-cls's training path on ``batches``: a resnet18 CamNet, its Sgd groups and poly schedule, the
    CamObjective wrapped by ``wrap_distributed``, :func:`fit`.  Returns the final weights as numpy arrays
    (without ``train``: the initial ones).

    BatchNorm is frozen (``freeze_bn``): in training mode it would normalise each rank's half of the batch with
    that half's statistics, and no averaging of gradients makes two halves equal to the whole.
    """
    from wsss.losses import CamObjective
    from wsss.models.classifier import CamNet
    from wsss.optim import Sgd
    from wsss.training import wrap_distributed

    torch.manual_seed(0)
    model = CamNet("resnet18", num_classes=3, freeze_bn=True)
    sgd = Sgd(lr=0.05)
    optimizer = sgd.optimizer(*model.parameter_groups())
    cpu = torch.device("cpu")
    precision = resolve_precision("off", cpu)
    trainee = Trainee(model, optimizer, sgd.scheduler(optimizer, DDP_STEPS), grad_scaler(precision, cpu))
    spec = RunSpec(out, ToyConfig(), ("lr",), DDP_STEPS, ["background", "a", "b"], model.arch)
    objective = wrap_distributed(CamObjective(model), cpu, info)
    loop = Loop(lambda batch, step: objective(*batch), round_steps=DDP_STEPS, summarize=lambda state, done: {})
    if train:
        fit(trainee, batches, loop, spec, TrainState(), precision=precision, device=cpu, info=info)
    return {name: tensor.detach().numpy().copy() for name, tensor in model.state_dict().items()}


def _ddp_rank(rank: int, world_size: int, init_file: str, out: str, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        rows = slice(2 * rank, 2 * rank + 2)
        batches = [(images[rows], targets[rows]) for images, targets in _ddp_batches()]
        results[rank] = _train_cam_net(Path(out), batches, DistInfo(rank=rank, local_rank=rank, world_size=world_size))
    finally:
        dist.destroy_process_group()


def _largest_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max(float(abs(torch.from_numpy(first[name]).double() - torch.from_numpy(second[name]).double()).max())
               for name in first)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_gloo_processes_train_the_weights_of_one_process_on_the_whole_batch(tmp_path):
    """DDP averages the two ranks' gradients, so 3 steps of train-cls's path on two halves of each batch end with
    the weights of one process on the whole batches (the loss is a mean over equal halves)."""
    import torch.multiprocessing as mp

    single = _train_cam_net(tmp_path / "single", _ddp_batches(), DistInfo())
    initial = _train_cam_net(tmp_path / "untrained", [], DistInfo(), train=False)
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "ddp"), results), nprocs=2, join=True)
    moved = _largest_difference(single, initial)
    assert moved > 1e-2  # the steps changed the weights far beyond the tolerance below
    for rank in (0, 1):
        assert _largest_difference(results[rank], single) < 1e-5, rank
    # a rank training on its half alone (no averaging) ends far from the whole-batch weights
    half = _train_cam_net(tmp_path / "half", [(images[:2], targets[:2]) for images, targets in _ddp_batches()],
                          DistInfo())
    assert _largest_difference(half, single) > 100 * 1e-5
    assert artifacts.load_checkpoint(artifacts.checkpoint_path(tmp_path / "ddp", "last"))["step"] == DDP_STEPS
