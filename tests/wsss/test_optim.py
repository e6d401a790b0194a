"""wsss/optim.py: SGD with a faster head (--head-lr-mult) and the poly (--poly-power) and cosine schedules."""

import math

import pytest
import torch

from wsss.optim import Sgd, cosine_scheduler, poly_scheduler, sgd_with_head


def _lrs(scheduler, steps: int) -> list[list[float]]:
    """The learning rate of every group before each of ``steps`` steps and after the last."""
    rates = []
    for _ in range(steps):
        rates.append([group["lr"] for group in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return rates + [[group["lr"] for group in scheduler.optimizer.param_groups]]


def test_the_head_learns_head_lr_mult_times_faster():
    backbone, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    optimizer = sgd_with_head([backbone, frozen], [head], lr=0.1, weight_decay=0.0, momentum=0.0, head_lr_mult=4.0)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.1, 0.4])
    assert optimizer.param_groups[0]["params"] == [backbone]  # parameters without gradients are left out
    (backbone.sum() + head.sum()).backward()  # gradient 1 everywhere
    optimizer.step()
    # one plain SGD step moves each weight by its group's lr times its gradient
    assert backbone.tolist() == pytest.approx([-0.1, -0.1]) and head.tolist() == pytest.approx([-0.4, -0.4])


def test_poly_schedule_by_hand():
    # lr at step k of 4 with power 2: base x (1 - k / 4)^2 = 1, 9/16, 1/4, 1/16, 0, and 0 after the end
    optimizer = sgd_with_head([torch.nn.Parameter(torch.zeros(1))], [torch.nn.Parameter(torch.zeros(1))], lr=0.1,
                              weight_decay=0.0, head_lr_mult=10.0)
    rates = _lrs(poly_scheduler(optimizer, 4, power=2.0), 5)
    factors = [1.0, 9 / 16, 1 / 4, 1 / 16, 0.0, 0.0]
    assert [backbone for backbone, _ in rates] == pytest.approx([0.1 * factor for factor in factors])
    assert [head for _, head in rates] == pytest.approx([1.0 * factor for factor in factors])  # the head keeps its x10
    # power 0.9 (the default) at step 1 of 4: 0.75^0.9; power 0 keeps the learning rate constant
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert _lrs(poly_scheduler(optimizer, 4), 1)[1][0] == pytest.approx(0.75 ** 0.9)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert [lr for lr, in _lrs(poly_scheduler(optimizer, 4, power=0.0), 3)] == [1.0, 1.0, 1.0, 1.0]


def test_cosine_schedule_with_warmup_by_hand():
    # 2 warm-up steps of 6: 1/2, 1; then 0.5 (1 + cos(pi p)) for p = 0, 1/4, 1/2, 3/4 of the other 4; 0 at the end
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    rates = [lr for lr, in _lrs(cosine_scheduler(optimizer, 6, warmup_steps=2), 6)]
    quarter = 0.5 * (1 + math.cos(math.pi / 4))
    assert rates == pytest.approx([2 * 0.5, 2 * 1.0, 2 * 1.0, 2 * quarter, 2 * 0.5, 2 * (1 - quarter), 0.0])


def test_sgd_settings_build_the_optimizer_and_schedule_they_name():
    sgd = Sgd(lr=0.02, head_lr_mult=5.0, weight_decay=1e-3, momentum=0.8, poly_power=2.0)
    backbone, head = [torch.nn.Parameter(torch.zeros(1))], [torch.nn.Parameter(torch.zeros(1))]
    optimizer = sgd.optimizer(backbone, head)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.02, 0.1])
    assert all(group["momentum"] == 0.8 and group["weight_decay"] == 1e-3 for group in optimizer.param_groups)
    rates = _lrs(sgd.scheduler(optimizer, 4), 1)
    assert rates[1] == pytest.approx([0.02 * 0.75 ** 2, 0.1 * 0.75 ** 2])
    with pytest.raises(ValueError, match="--head-lr-mult"):
        Sgd(head_lr_mult=0.0)
