"""The router contract: what every router takes and returns.

A router is a small ``nn.Module`` that owns its parameters (gate weights, bias buffers) around a pure function
that turns scores into a :mod:`~smoe.routing.plan`. It never touches expert weights and never moves data.

Shape legend: ``T`` tokens (in routing-group order), ``D`` width, ``E`` experts, ``K`` top-k, ``G`` groups of
``S`` tokens (``T = G*S``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe.routing.plan import RoutingPlan

__all__ = ["Router", "RouterOutput", "RoutingContext", "router_logits_fp32"]


@dataclass(frozen=True, kw_only=True)
class RoutingContext:
    """Side information a router may use; the MoE layer fills it, routers read what they need.

    Attributes:
        group_size: ``S``; tokens compete for capacity only inside contiguous groups of ``S`` tokens.
        token_ids_T: ``(T,)`` int64 input token ids in routing order (hash routing), or ``None``.
        attn_probs: attention probabilities handed over from the preceding attention layer, ``(B, H, L, L)``
            or ``(B, L, L)`` in the model's own (batch, position) order, or ``None``.
        batch_shape: ``(B, L)`` of the layer input when it was 3-d, else ``(1, T)``.
        group_mode: how the layer formed the groups: ``"batch"``, ``"sequence"``, ``"position"`` or ``"size"``.
        loss_TD: optional per-token signal for routers that learn from expert outcomes (comparison training).
    """

    group_size: int
    token_ids_T: Tensor | None = None
    attn_probs: Tensor | None = None
    batch_shape: tuple[int, int] = (1, 1)
    group_mode: str = "batch"
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RouterOutput:
    """What a router returns.

    Attributes:
        plan: the routing plan (sparse or dense).
        losses: unweighted auxiliary losses by name, scalar tensors (e.g. ``"balance"``, ``"z"``).
        loss: weighted sum of the auxiliary losses, a scalar tensor (zero when none applies).
        probs_TE: ``(T, E)`` router probabilities for diagnostics (entropy), or ``None``.
        inputs_RD: rows the engine should read instead of the layer input (``R != T`` for routers that add
            rows, e.g. S2MoE's noisy copy); ``None`` means the layer input.
        stats: extra router-specific statistics (tensors).
    """

    plan: RoutingPlan
    losses: dict[str, Tensor]
    loss: Tensor
    probs_TE: Tensor | None = None
    inputs_RD: Tensor | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)


def router_logits_fp32(x_TD: Tensor, weight_ED: Tensor, bias_E: Tensor | None = None) -> Tensor:
    """Router logits in float32 whatever the autocast state (selective precision, Switch Transformer §2.4)."""
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        return F.linear(x_TD.float(), weight_ED.float(), None if bias_E is None else bias_E.float())


class Router(nn.Module):
    """Base class of all routers.

    Subclasses set ``couples_tokens`` (class attribute or property): whether a token's routing depends on other
    tokens of its group. Coupling routers leak information across positions of an autoregressive model unless
    groups hold one token per sequence (``group_mode="position"``); the MoE layer refuses such a causal
    configuration unless the user opts in. ``plan_kind`` says which plan form the router returns.
    """

    couples_tokens: ClassVar[bool] = False
    plan_kind: ClassVar[str] = "sparse"
    #: whether the router has parameters that receive gradients from the task loss
    differentiable: ClassVar[bool] = True

    def __init__(self, *, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = top_k

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}"
