"""USMoE unified competitive routing (Do, Le, Tran, "Sparse MoE as Unified Competitive Learning", arXiv 2503.22996;
v3 "Rethinking Sparse Mixture of Experts from a Unified Perspective"), reference §4.2.

Token choice lets every token pick its ``K`` best experts ("horizontal" competition); expert choice lets every
expert pick its best tokens ("vertical" competition). USMoE scores every token-expert pair with a mix of both views
and lets *all* pairs of a routing group compete for one budget of ``S*K`` pairs (reference §4.2.2, the rule in the
authors' code ``giangdip2410/USMoE``, identical in its OLMoE, Qwen1.5-MoE and scratch layers, appendix A2)::

    s[t, e] = (1 - rate) * softmax(z_t)[e] + rate * sigmoid(z[t, e]) * 2 / E        # unified competitive score
    pairs   = top-(S*K) of s over the (S*E) pairs of the group                        # unified competitive mechanism
    y_t     = sum_{e: (t, e) in pairs} s[t, e] * f_e(x_t)                             # weight = the mixed score

A token gets 0..E experts; the budget equals top-K token choice but goes where the scores are highest. There is
no per-expert capacity, so an expert's load is unbounded (the dropless engine handles it). Gradients reach the gate
only through the weights of the selected pairs.

What is confirmed and what is not:

* The rule above, ``rate = 0.5`` and "weights not renormalised" are from the authors' code (confirmed).
* Whether the paper's ``f_e`` is exactly the code's ``sigmoid * 2/E`` is **unconfirmed** (reference §13).
* ``budget`` < 1 ("fractional top-k", the 14% compute saving of the abstract) is our reading: the budget used for
  that claim is **unconfirmed**.
* The authors' code attaches no balance loss; ``balance_loss_weight`` defaults to 0 here. When set, we use the
  Switch form ``E * sum_i f_i P_i`` with ``f_i`` the share of the selected pairs that went to expert ``i``.

Causality (reference §4.2.5 pitfall 1): the selection couples all tokens of a group, so in a causal model use
``group_mode="position"`` (the layout the authors' Transformer-XL code effectively ran, pitfall 2).

Shape legend: ``T`` tokens in routing order, ``G`` groups of ``S`` tokens, ``E`` experts, ``K`` top-k, ``N`` rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from smoe.routing.base import RouterOutput, RoutingContext
from smoe.routing.gated import GatedRouter
from smoe.routing.options import flag, real
from smoe.routing.plan import SparsePlan
from smoe.routing.registry import register_router

__all__ = ["USMoERouter", "unified_scores", "usmoe_plan"]


def unified_scores(logits_TE: Tensor, rate: float) -> Tensor:
    """Unified competitive score ``(1 - rate) * softmax(z) + rate * sigmoid(z) * 2 / E`` (authors' code).

    Args:
        logits_TE: ``(T, E)`` float32 router logits.
        rate: weight of the expert-side (sigmoid) score, in ``[0, 1]``.

    Returns:
        ``(T, E)`` mixed scores in ``(0, 1)``.
    """
    E = logits_TE.shape[-1]
    return (1.0 - rate) * logits_TE.softmax(dim=-1) + rate * torch.sigmoid(logits_TE) * (2.0 / E)


def usmoe_plan(scores_GSE: Tensor, pairs_per_group: int) -> SparsePlan:
    """Select the ``pairs_per_group`` highest-scoring token-expert pairs of every group.

    Args:
        scores_GSE: ``(G, S, E)`` mixed scores (differentiable; they become the combine weights).
        pairs_per_group: ``P``, pairs kept per group, ``1 <= P <= S*E``.

    Returns:
        A sparse plan with exactly ``G * P`` rows, sorted by expert, weights = the selected scores.
    """
    G, S, E = scores_GSE.shape
    flat_GP = scores_GSE.reshape(G, S * E)
    pair_GP = flat_GP.detach().topk(pairs_per_group, dim=-1).indices  # top-(S*K) pairs of the group
    token_N = (pair_GP // E + torch.arange(G, device=pair_GP.device).unsqueeze(1) * S).reshape(-1)
    expert_N = (pair_GP % E).reshape(-1)
    weight_N = flat_GP.gather(1, pair_GP).reshape(-1)
    order = torch.argsort(expert_N, stable=True)
    expert_sorted = expert_N[order]
    return SparsePlan(
        token_idx_N=token_N[order],
        expert_idx_N=expert_sorted,
        weight_N=weight_N[order],
        counts_E=torch.bincount(expert_sorted, minlength=E),
        num_tokens=G * S,
        num_requested=G * pairs_per_group,  # no capacity: every selected pair is run
    )


@register_router("usmoe")
class USMoERouter(GatedRouter):
    """USMoE: top-``(S*K)`` token-expert pairs per group by the unified competitive score (module docstring).

    Args (beyond :class:`~smoe.routing.gated.GatedRouter`):
        rate: weight of the expert-side score, ``0.5`` in the authors' code (``rate = 0``: softmax scores only).
        budget: fraction of the token-choice budget ``S*K`` to spend (``< 1``: fractional top-k, unconfirmed).
        renormalize: divide each token's selected weights by their sum (``norm_topk_prob``; off in the authors'
            OLMoE / Qwen1.5 runs).
        balance_loss_weight: Switch-style balance loss on the selected pairs; 0 (the authors attach none).
    """

    couples_tokens = True

    OPTIONS = {"rate": real(ge=0, le=1), "budget": real(gt=0, le=1), "renormalize": flag()}

    def __init__(
        self,
        *,
        rate: float = 0.5,
        budget: float = 1.0,
        renormalize: bool = False,
        balance_loss_weight: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(balance_loss_weight=balance_loss_weight, **kwargs)
        if self.capacity_factor is not None:
            raise ValueError(
                f"usmoe has no per-expert capacity (the budget is per group); capacity_factor must be None, "
                f"got {self.capacity_factor!r}"
            )
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate!r}")
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {budget!r}")
        self.rate, self.budget, self.renormalize = rate, budget, renormalize

    def experts_per_token(self, group_size: int | None = None) -> float:
        """Average experts per token (for FLOP accounting): ``budget * K``."""
        return self.budget * self.top_k

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        S = ctx.group_size
        G = T // S
        logits_TE = self.logits(x_TD)
        scores_TE = unified_scores(logits_TE, self.rate)
        pairs = min(max(1, math.ceil(self.budget * S * K - 1e-9)), S * E)
        plan = usmoe_plan(scores_TE.view(G, S, E), pairs)
        if self.renormalize:
            # norm_topk_prob: each token's selected weights sum to one
            total_T = torch.zeros(T, device=x_TD.device, dtype=plan.weight_N.dtype).index_add(
                0, plan.token_idx_N, plan.weight_N
            )
            plan = SparsePlan(
                token_idx_N=plan.token_idx_N,
                expert_idx_N=plan.expert_idx_N,
                weight_N=plan.weight_N / total_T[plan.token_idx_N].clamp_min(1e-20),
                counts_E=plan.counts_E,
                num_tokens=plan.num_tokens,
                num_requested=plan.num_requested,
            )
        probs_TE = logits_TE.softmax(dim=-1)
        losses, total = self.standard_losses(logits_TE.view(G, S, E), probs_TE.view(G, S, E), None)
        if self.balance_loss_weight:
            # Switch form with f_i = share of the group's selected pairs that went to expert i
            group_N = plan.token_idx_N // S
            counts_GE = torch.zeros(G, E, device=x_TD.device).index_put_(
                (group_N, plan.expert_idx_N), torch.ones_like(group_N, dtype=torch.float32), accumulate=True
            )
            f_GE = counts_GE / pairs
            losses["balance"] = (E * (f_GE * probs_TE.view(G, S, E).mean(dim=1)).sum(-1)).mean()
            total = total + self.balance_loss_weight * losses["balance"]
        stats = {"experts_per_token_max": torch.bincount(plan.token_idx_N, minlength=T).max()}
        return RouterOutput(plan=plan, losses=losses, loss=total, probs_TE=probs_TE, stats=stats)
