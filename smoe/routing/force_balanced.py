"""A forced-balanced router for benchmarks and throughput tests (not for training quality).

Token ``t`` goes to experts ``(t*K + j) mod E`` for ``j < K``: every expert receives ``T*K/E`` assignments (exactly,
when ``E`` divides ``T*K``), independent of learned weights, so timings do not depend on how routing happens to
converge (torchtitan ``_debug_force_load_balance``, megablocks ``uniform_expert_assignment``). The combine weights
are the gate's softmax probabilities of the assigned experts, so the gate GEMM and its gradient are still paid for.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.routing.base import RouterOutput, RoutingContext
from smoe.routing.gated import GatedRouter
from smoe.routing.plan import sparse_plan_from_topk
from smoe.routing.registry import register_router

__all__ = ["ForceBalancedRouter"]


@register_router("force_balanced")
class ForceBalancedRouter(GatedRouter):
    """Round-robin assignment with gate-probability weights (see module docstring)."""

    def __init__(self, *, balance_loss_weight: float = 0.0, **kwargs) -> None:
        if kwargs.get("capacity_factor") is not None:  # its capacity is S*K/E by construction
            raise ValueError(
                f"force_balanced routing gives every expert exactly S*K/E tokens; capacity_factor must be None, got "
                f"{kwargs['capacity_factor']!r}"
            )
        super().__init__(balance_loss_weight=balance_loss_weight, **kwargs)

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        base_T1 = (torch.arange(T, device=x_TD.device) * K).unsqueeze(1)
        expert_idx_TK = (base_T1 + torch.arange(K, device=x_TD.device)) % E
        plan = sparse_plan_from_topk(expert_idx_TK, probs_TE.gather(1, expert_idx_TK), E)
        S = ctx.group_size
        losses, total = self.standard_losses(logits_TE.view(-1, S, E), probs_TE.view(-1, S, E), None)
        return RouterOutput(plan=plan, losses=losses, loss=total, probs_TE=probs_TE)
