"""SGD with a ×10 head learning rate and the poly schedule used across WSSS.

The training stages' configs hold an :class:`Sgd` group, so this module imports torch only where an
optimiser or a schedule is made: ``wsss train-cls --help`` does not load it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from wsss.settings import Settings, setting

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Sgd(Settings):
    """SGD with momentum, a faster head and the poly schedule: the optimiser of every training stage.

    A stage holds one as its ``sgd`` group (options without a prefix: ``--lr``, ``--momentum``);
    each stage sets its own learning rate, e.g. ``setting(factory=lambda: Sgd(lr=0.1), prefix="")``.
    """

    lr: float = setting(0.1, "Backbone learning rate (the head's is this times --head-lr-mult).", above=0)
    head_lr_mult: float = setting(10.0, "Learning-rate factor of the new layers (the head).", above=0)
    weight_decay: float = setting(1e-4, "L2 weight decay of every parameter.", at_least=0)
    momentum: float = setting(0.9, "SGD momentum.", at_least=0, below=1)
    poly_power: float = setting(0.9, "Poly schedule: lr = base lr x (1 - step / steps) ^ power.", at_least=0)

    def optimizer(self, backbone_params: Iterable, head_params: Iterable) -> torch.optim.SGD:
        """:func:`sgd_with_head` with these settings."""
        return sgd_with_head(backbone_params, head_params, lr=self.lr, weight_decay=self.weight_decay,
                             momentum=self.momentum, head_lr_mult=self.head_lr_mult)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int):
        """:func:`poly_scheduler` with this power."""
        return poly_scheduler(optimizer, total_steps, power=self.poly_power)


def sgd_group(lr: float):
    """A stage's ``sgd`` field: the :class:`Sgd` options at the top level, with the stage's learning rate."""
    return setting(factory=lambda: Sgd(lr=lr), prefix="")


def sgd_with_head(backbone_params: Iterable, head_params: Iterable, *, lr: float, weight_decay: float,
                  momentum: float = 0.9, head_lr_mult: float = 10.0) -> torch.optim.SGD:
    """SGD over two parameter groups: the backbone at ``lr`` and the head at ``lr * head_lr_mult``."""
    import torch

    groups = [
        {"params": [p for p in backbone_params if p.requires_grad], "lr": lr},
        {"params": [p for p in head_params if p.requires_grad], "lr": lr * head_lr_mult},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def poly_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9):
    """LambdaLR with factor ``(1 - step / total_steps) ** power`` (stepped once per iteration)."""
    import torch

    total_steps = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - min(step, total_steps) / total_steps) ** power)


def cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0):
    """LambdaLR: linear warm-up over ``warmup_steps``, then ``0.5 (1 + cos(pi * progress))`` to 0.

    The schedule of SimCLR and MoCo v2 (stepped once per iteration).
    """
    import torch

    total_steps, warmup_steps = max(1, total_steps), max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
