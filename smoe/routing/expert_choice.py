"""Expert-choice routing (Zhou et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS 2022).

Each expert picks its top-``c`` tokens of the group by score (reference §4.1.1, eq. 1-2):
``S = softmax(X W^T)`` over experts, ``G, I = TopK(S^T, c)`` per expert, and the combine weight of a picked
``(token, expert)`` is ``S[token, expert]`` (not renormalised). Load is balanced by construction, so there is no
balancing loss; a token may be picked by 0..E experts. ``c = cf * S / E`` with ``cf`` the capacity factor
(the paper's "average experts per token", EC-CF2 uses 2); when the layer's ``capacity_factor`` is ``None`` we use
``cf = top_k`` so that compute matches top-k token choice.

Expert choice couples tokens: an expert's pick depends on the whole group. In a causal model use
``group_mode="position"`` (experts pick among the batch's tokens at one position) or opt in explicitly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.routing.base import RouterOutput, RoutingContext
from smoe.routing.capacity import compute_capacity
from smoe.routing.gated import GatedRouter
from smoe.routing.options import integer, real
from smoe.routing.plan import SparsePlan
from smoe.routing.registry import register_router

__all__ = ["ExpertChoiceRouter", "expert_choice_plan"]


def expert_choice_plan(probs_GSE: Tensor, capacity: int) -> SparsePlan:
    """Pure expert-choice selection: each expert takes its ``capacity`` highest-scoring tokens in every group.

    Args:
        probs_GSE: ``(G, S, E)`` token-to-expert affinities.
        capacity: ``c``, tokens per expert and group (clamped to ``S``).

    Returns:
        A sparse plan with exactly ``G * c`` rows per expert.
    """
    G, S, E = probs_GSE.shape
    c = min(capacity, S)
    weight_GEC, token_GEC = probs_GSE.transpose(1, 2).topk(c, dim=-1)  # per (group, expert): top-c tokens
    token_GEC = token_GEC + (torch.arange(G, device=probs_GSE.device) * S).view(G, 1, 1)
    token_N = token_GEC.transpose(0, 1).reshape(-1)  # expert-major rows
    return SparsePlan(
        token_idx_N=token_N,
        expert_idx_N=torch.arange(E, device=probs_GSE.device).repeat_interleave(G * c),
        weight_N=weight_GEC.transpose(0, 1).reshape(-1),
        counts_E=torch.full((E,), G * c, dtype=torch.long, device=probs_GSE.device),
        num_tokens=G * S,
        num_requested=E * G * c,  # experts always fill their buffers: nothing is dropped by capacity
    )


@register_router("expert_choice")
class ExpertChoiceRouter(GatedRouter):
    """Expert choice with capacity ``c = ceil(cf * S / E)`` per group (see module docstring).

    Args (beyond :class:`~smoe.routing.gated.GatedRouter`, whose balance loss defaults to off here):
        noise_std: optional gaussian noise on the logits in training, sigma = noise_std / E (vmoe), default 0.
        capacity_multiple_of: round ``c`` up to a multiple of this (:func:`~smoe.routing.capacity.compute_capacity`;
            default 1, vmoe's ``capacity_multiple_of`` default is 4), then clamp it to ``S``.
    """

    couples_tokens = True
    capacity_options = frozenset({"capacity_factor"})

    OPTIONS = {"noise_std": real(ge=0), "capacity_multiple_of": integer(ge=1)}

    def __init__(
        self, *, noise_std: float = 0.0, capacity_multiple_of: int = 1, balance_loss_weight: float = 0.0, **kwargs
    ) -> None:
        super().__init__(balance_loss_weight=balance_loss_weight, **kwargs)
        self.noise_std = noise_std
        self.capacity_multiple_of = capacity_multiple_of

    def capacity(self, group_size: int) -> int:
        """Tokens per expert and group: ``ceil(cf * S / E)`` (``cf = top_k`` when unset) rounded up to a multiple
        of ``capacity_multiple_of``, then clamped to ``S`` (an expert cannot take more tokens than the group has;
        the clamped value need not be a multiple)."""
        cf = self.capacity_factor if self.capacity_factor is not None else float(self.top_k)
        c = compute_capacity(group_size, self.num_experts, cf, 1, multiple_of=self.capacity_multiple_of)
        return min(c, group_size)

    def experts_per_token(self, group_size: int | None = None) -> float:
        """The capacity factor: each expert takes ``cf * S / E`` of ``S`` tokens (``top_k`` when it is ``None``)."""
        return float(self.capacity_factor if self.capacity_factor is not None else self.top_k)

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        T, E = x_TD.shape[0], self.num_experts
        S = ctx.group_size
        G = T // S
        logits_TE = self.logits(x_TD)
        if self.training and self.noise_std > 0:
            logits_TE = logits_TE + (self.noise_std / E) * torch.randn_like(logits_TE)
        probs_TE = logits_TE.softmax(dim=-1)
        plan = expert_choice_plan(probs_TE.view(G, S, E), self.capacity(S))
        losses, total = self.standard_losses(logits_TE.view(G, S, E), probs_TE.view(G, S, E), None)
        return RouterOutput(plan=plan, losses=losses, loss=total, probs_TE=probs_TE)
