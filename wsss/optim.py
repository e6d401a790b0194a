"""SGD with a ×10 head learning rate and the poly schedule used across WSSS."""

from __future__ import annotations

from typing import Iterable

import torch


def sgd_with_head(backbone_params: Iterable, head_params: Iterable, *, lr: float, weight_decay: float,
                  momentum: float = 0.9, head_lr_mult: float = 10.0) -> torch.optim.SGD:
    """SGD over two parameter groups: the backbone at ``lr`` and the head at ``lr * head_lr_mult``."""
    groups = [
        {"params": [p for p in backbone_params if p.requires_grad], "lr": lr},
        {"params": [p for p in head_params if p.requires_grad], "lr": lr * head_lr_mult},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def poly_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9):
    """LambdaLR with factor ``(1 - step / total_steps) ** power`` (stepped once per iteration)."""
    total_steps = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - min(step, total_steps) / total_steps) ** power)


def cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0):
    """LambdaLR: linear warm-up over ``warmup_steps``, then ``0.5 (1 + cos(pi * progress))`` to 0.

    The schedule of SimCLR and MoCo v2 (stepped once per iteration).
    """
    import math

    total_steps, warmup_steps = max(1, total_steps), max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
