"""Aux-loss-free load balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for MoE";
DeepSeek-V3 §2.1.2).

Routers built with ``expert_bias=True`` keep a persistent ``expert_bias_E`` buffer that shifts expert *selection*
only, and a ``tokens_per_expert_E`` counter that their ``forward`` accumulates in training. The bias is updated
outside ``forward`` -- once per optimizer step, so that it works with gradient accumulation -- by
``b_i += rate * sign(mean_load - load_i)``, after which the counters are reset.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["update_expert_bias", "register_bias_update_hook", "load_counters"]


def load_counters(model: nn.Module) -> list[torch.Tensor]:
    """The ``tokens_per_expert_E`` counters of every router of ``model`` that has an expert bias."""
    return [
        m.tokens_per_expert_E
        for m in model.modules()
        if getattr(m, "expert_bias_E", None) is not None and getattr(m, "tokens_per_expert_E", None) is not None
    ]


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float = 1e-3) -> int:
    """Apply one bias update to every router of ``model`` that has an expert bias; returns how many were updated."""
    updated = 0
    for module in model.modules():
        bias_E = getattr(module, "expert_bias_E", None)
        load_E = getattr(module, "tokens_per_expert_E", None)
        if bias_E is None or load_E is None:
            continue
        if load_E.sum() > 0:
            bias_E += rate * torch.sign(load_E.mean() - load_E)
            updated += 1
        load_E.zero_()
    return updated


def register_bias_update_hook(optimizer: torch.optim.Optimizer, model: nn.Module, rate: float = 1e-3):
    """Run :func:`update_expert_bias` before every ``optimizer.step()``; returns the hook handle."""

    def hook(opt, args, kwargs):
        update_expert_bias(model, rate)

    return optimizer.register_step_pre_hook(hook)
