"""Random routing baseline: every token goes to ``K`` distinct experts drawn uniformly at random.

The control experiment of the routing literature: Roller et al. (NeurIPS 2021, "Hash Layers") and others compare
learned routers with random assignment to measure what routing actually buys. Here the experts of a token are the
top-K of ``E`` i.i.d. uniform draws (i.e. a uniformly random K-subset), and the combine weights are ``1/K``; no
parameters, no losses, balanced in expectation (each expert receives ``T*K/E`` assignments on average).

Randomness:

* in training, draws come from torch's global generator (reproducible under :func:`torch.manual_seed`), so every
  step sees a fresh assignment;
* in evaluation, draws come from a private generator re-seeded with the persistent ``seed`` buffer at every call, so
  the same input is always routed the same way (row ``t`` of the routing order always receives the same experts).

Draws are per token (row ``t`` of a ``(T, E)`` uniform tensor), so routing never couples tokens and is causal-safe.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.routing.base import Router, RouterOutput, RoutingContext
from smoe.routing.options import integer
from smoe.routing.plan import sparse_plan_from_topk
from smoe.routing.registry import register_router

__all__ = ["RandomRouter", "random_experts"]


def random_experts(num_tokens: int, num_experts: int, top_k: int, generator=None, device=None) -> Tensor:
    """``(T, K)`` uniformly random distinct experts per token (top-K of i.i.d. uniform scores)."""
    u_TE = torch.rand(num_tokens, num_experts, generator=generator, device=device)
    return u_TE.topk(top_k, dim=-1).indices


@register_router("random")
class RandomRouter(Router):
    """Uniformly random routing (module docstring).

    Args:
        dim, num_experts, top_k: the common router arguments (``dim`` is unused).
        capacity_factor: must be ``None`` (dropless).
        seed: the evaluation-time seed (stored as a persistent buffer).
    """

    couples_tokens = False
    differentiable = False

    OPTIONS = {"seed": integer(ge=0)}

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float | None = None,
        seed: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, top_k=top_k)
        if capacity_factor is not None:
            raise ValueError(f"random routing is dropless; capacity_factor must be None, got {capacity_factor!r}")
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.long, device=device))

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        T, K, E = x_TD.shape[0], self.top_k, self.num_experts
        generator = None
        if not self.training:
            generator = torch.Generator(device=x_TD.device).manual_seed(int(self.seed))
        expert_idx_TK = random_experts(T, E, K, generator=generator, device=x_TD.device)
        weight_TK = torch.full((T, K), 1.0 / K, device=x_TD.device)
        plan = sparse_plan_from_topk(expert_idx_TK, weight_TK, E)
        return RouterOutput(plan=plan, losses={}, loss=x_TD.new_zeros((), dtype=torch.float32))
