"""AdamW with decoupled weight decay on matrices only, and a linear warm-up + cosine decay schedule.

The schedule is a small callable dataclass inside ``LambdaLR``, so its state (and the scheduler's) is plain numbers
that the checkpoint stores as JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from smoe.train.config import TrainConfig

__all__ = ["WarmupCosine", "build_optimizer", "build_scheduler"]


@dataclass
class WarmupCosine:
    """Learning-rate multiplier of step ``s`` (0-indexed): ``(s+1)/W`` for ``s < W``, then a cosine from 1 down to
    ``min_ratio`` at the last step ``total - 1``.

    Example: ``W=2, total=6, min_ratio=0``: multipliers ``0.5, 1.0, 1.0, 0.75, 0.25, 0.0`` (cosine progress
    ``(s-2)/3`` gives ``0.5*(1+cos(pi*p))`` for ``p = 0, 1/3, 2/3, 1``).
    """

    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on tensors of rank >= 2, none on biases and norms."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: one kernel per tensor, the same arithmetic whatever the tensor list (reproducible resume)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` driven by :class:`WarmupCosine` over ``cfg.steps``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
