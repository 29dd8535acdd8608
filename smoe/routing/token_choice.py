"""Token-choice top-k routing: Switch (k=1), GShard, Mixtral, V-MoE (with Batch Prioritized Routing), DeepSeek-V3.

Each token picks ``K`` experts from its router scores. The variants differ in a handful of switches, all explicit
here (reference §3.1 and §12.1):

* ``order="softmax_topk"``: ``gates = softmax(logits)``, keep the top-k gates as combine weights, *not*
  renormalised (V-MoE ``TOP_k(softmax(Wx + eps))``, Riquelme et al. 2021 eq. 1; Switch for k=1).
  ``renormalize=True`` divides by their sum (GShard / fairseq top-2).
* ``order="topk_softmax"``: top-k on the logits, softmax over the k chosen logits (Mixtral; identical to
  softmax-then-top-k-then-renormalise in exact arithmetic).
* ``score_fn="sigmoid"``: independent sigmoid scores (DeepSeek-V3), usually with ``renormalize=True``.
* ``noise="gaussian"``: additive ``N(0, (noise_std/E)^2)`` on the logits in training (V-MoE);
  ``noise="jitter"``: multiplicative ``U(1-eps, 1+eps)`` on the router *inputs* (Switch / flaxformer).
* ``capacity_factor``: ``None`` is dropless; otherwise each expert accepts ``C = ceil(cf*S*K/E)`` assignments per
  group of ``S`` tokens, placed all-top-1-first then by position, or by descending top-1 gate with
  ``batch_priority=True`` (V-MoE BPR, usable with ``cf < 1`` at test time for adaptive compute).
* ``expert_bias=True``: aux-loss-free balancing (DeepSeek-V3, Wang et al. 2024 "Auxiliary-loss-free load balancing"):
  a per-expert bias buffer is added to the scores *for selection only*; combine weights use the unbiased scores.
  The bias is updated outside ``forward`` by :func:`smoe.routing.bias_balancing.update_expert_bias`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from smoe.routing.base import RouterOutput, RoutingContext
from smoe.routing.capacity import token_choice_keep_mask
from smoe.routing.gated import GatedRouter
from smoe.routing.options import choice, flag, integer, real
from smoe.routing.plan import sparse_plan_from_topk
from smoe.routing.registry import register_router

__all__ = ["TokenChoiceRouter", "top_k_choice"]


def top_k_choice(
    logits_TE: Tensor,
    top_k: int,
    *,
    score_fn: str = "softmax",
    order: str = "softmax_topk",
    renormalize: bool = False,
    selection_bias_E: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pure top-k selection.

    Args:
        logits_TE: ``(T, E)`` float32 logits (noise already applied if any).
        top_k: ``K``.
        score_fn: ``"softmax"`` or ``"sigmoid"``.
        order: ``"softmax_topk"`` or ``"topk_softmax"`` (softmax only).
        renormalize: divide the kept weights by their sum.
        selection_bias_E: ``(E,)`` bias added to the scores for the choice only (aux-loss-free balancing).

    Returns:
        ``(expert_idx_TK, weight_TK, probs_TE)``: chosen experts, combine weights, and the per-token probability
        vector used for losses and diagnostics.
    """
    if score_fn == "softmax":
        probs_TE = logits_TE.softmax(dim=-1)
        if order == "softmax_topk":
            choice_TE = probs_TE if selection_bias_E is None else probs_TE + selection_bias_E
            expert_idx_TK = choice_TE.topk(top_k, dim=-1).indices
            weight_TK = probs_TE.gather(1, expert_idx_TK)
        elif order == "topk_softmax":
            choice_TE = logits_TE if selection_bias_E is None else logits_TE + selection_bias_E
            expert_idx_TK = choice_TE.topk(top_k, dim=-1).indices
            weight_TK = logits_TE.gather(1, expert_idx_TK).softmax(dim=-1)
            renormalize = False  # already sums to one
        else:
            raise ValueError(f"order must be 'softmax_topk' or 'topk_softmax', got {order!r}")
    elif score_fn == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
        choice_TE = scores_TE if selection_bias_E is None else scores_TE + selection_bias_E
        expert_idx_TK = choice_TE.topk(top_k, dim=-1).indices
        weight_TK = scores_TE.gather(1, expert_idx_TK)
        # the sigmoids normalised to sum to one, computed as softmax(log sigmoid): the same numbers, but finite
        # (with finite gradients) when every sigmoid of a token underflows to 0 (logits below about -88 in float32)
        probs_TE = F.logsigmoid(logits_TE).softmax(dim=-1)
    else:
        raise ValueError(f"score_fn must be 'softmax' or 'sigmoid', got {score_fn!r}")
    if renormalize:
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return expert_idx_TK, weight_TK, probs_TE


@register_router("token_choice")
class TokenChoiceRouter(GatedRouter):
    """Top-k token choice (Shazeer et al. 2017; Switch, Fedus et al. 2021; GShard; Mixtral; V-MoE + BPR).

    Args (beyond :class:`~smoe.routing.gated.GatedRouter`):
        score_fn: ``"softmax"`` (default) or ``"sigmoid"``.
        order: ``"softmax_topk"`` (V-MoE, default) or ``"topk_softmax"`` (Mixtral).
        renormalize: renormalise the kept weights over the ``K`` choices.
        noise: ``None``, ``"gaussian"`` (V-MoE, sigma = noise_std / E) or ``"jitter"`` (Switch).
        noise_std: V-MoE ``noise_std`` (1.0 in the paper configs).
        jitter_eps: Switch jitter ``eps`` (1e-2).
        batch_priority: V-MoE Batch Prioritized Routing for capacity dropping.
        capacity_rounding / capacity_multiple_of: see :func:`smoe.routing.capacity.compute_capacity`.
        expert_bias: enable the aux-loss-free selection bias (DeepSeek-V3).
        eval_top_k: experts per token in evaluation mode (``None``: ``top_k``), e.g. the SMoE-VAE's dense training
            mixture (``top_k = E``) evaluated top-1.
    """

    capacity_options = frozenset({"capacity_factor", "batch_priority"})

    OPTIONS = {
        "score_fn": choice("softmax", "sigmoid"),
        "order": choice("softmax_topk", "topk_softmax"),
        "renormalize": flag(),
        "noise": choice("gaussian", "jitter", none=True),
        "noise_std": real(ge=0),
        "jitter_eps": real(ge=0, lt=1),
        "batch_priority": flag(),
        "capacity_rounding": choice("ceil", "round"),
        "capacity_multiple_of": integer(ge=1),
        "expert_bias": flag(),
        "eval_top_k": integer(ge=1, none=True),
    }

    def __init__(
        self,
        *,
        score_fn: str = "softmax",
        order: str = "softmax_topk",
        renormalize: bool = False,
        noise: str | None = None,
        noise_std: float = 1.0,
        jitter_eps: float = 1e-2,
        batch_priority: bool = False,
        capacity_rounding: str = "ceil",
        capacity_multiple_of: int = 1,
        expert_bias: bool = False,
        eval_top_k: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if score_fn not in ("softmax", "sigmoid"):
            raise ValueError(f"score_fn must be 'softmax' or 'sigmoid', got {score_fn!r}")
        if order not in ("softmax_topk", "topk_softmax"):
            raise ValueError(f"order must be 'softmax_topk' or 'topk_softmax', got {order!r}")
        if noise not in (None, "gaussian", "jitter"):
            raise ValueError(f"noise must be None, 'gaussian' or 'jitter', got {noise!r}")
        if batch_priority and self.capacity_factor is None:
            raise ValueError("batch_priority=True needs a capacity_factor (BPR only decides which tokens are dropped)")
        self.score_fn, self.order, self.renormalize = score_fn, order, renormalize
        self.noise, self.noise_std, self.jitter_eps = noise, noise_std, jitter_eps
        if eval_top_k is not None and (
            isinstance(eval_top_k, bool) or not isinstance(eval_top_k, int) or not 1 <= eval_top_k <= self.num_experts
        ):
            raise ValueError(f"eval_top_k must be None or in [1, num_experts={self.num_experts}], got {eval_top_k!r}")
        self.batch_priority = batch_priority
        self.eval_top_k = self.top_k if eval_top_k is None else eval_top_k
        self.capacity_rounding, self.capacity_multiple_of = capacity_rounding, capacity_multiple_of
        if expert_bias:
            # persistent: part of the checkpoint; the load counter is not
            self.register_buffer("expert_bias_E", torch.zeros(self.num_experts), persistent=True)
            self.register_buffer("tokens_per_expert_E", torch.zeros(self.num_experts), persistent=False)
        else:
            self.expert_bias_E = None
            self.tokens_per_expert_E = None

    @property
    def couples_tokens(self) -> bool:  # type: ignore[override]
        # capacity dropping makes a token's fate depend on the other tokens of its group
        return self.capacity_factor is not None

    def experts_per_token(self, group_size: int | None = None) -> float:
        """``top_k`` in training, ``eval_top_k`` in evaluation."""
        return float(self.top_k if self.training else self.eval_top_k)

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        T, E = x_TD.shape[0], self.num_experts
        K = self.top_k if self.training else self.eval_top_k
        S = ctx.group_size
        G = T // S
        noisy = self.training and self.noise is not None
        if noisy and self.noise == "jitter":
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        clean_logits_TE = self.logits(x_TD)
        logits_TE = clean_logits_TE
        sigma = self.noise_std / E
        if noisy and self.noise == "gaussian" and sigma > 0:
            logits_TE = clean_logits_TE + sigma * torch.randn_like(clean_logits_TE)
        expert_idx_TK, weight_TK, probs_TE = top_k_choice(
            logits_TE,
            K,
            score_fn=self.score_fn,
            order=self.order,
            renormalize=self.renormalize,
            selection_bias_E=self.expert_bias_E,
        )
        # BPR priority: the token's top-1 gate (noisy in training, as in vmoe), whatever the order
        priority_GS = probs_TE.max(dim=-1).values.view(G, S) if self.batch_priority else None
        keep_TK = token_choice_keep_mask(
            expert_idx_TK,
            S,
            E,
            self.capacity_factor,
            priority_GS,
            rounding=self.capacity_rounding,
            multiple_of=self.capacity_multiple_of,
        )
        if self.training and self.tokens_per_expert_E is not None:
            with torch.no_grad():
                self.tokens_per_expert_E += torch.bincount(expert_idx_TK.reshape(-1), minlength=E).float()
        plan = sparse_plan_from_topk(expert_idx_TK, weight_TK, E, keep_TK)
        # losses use the clean probabilities for importance (vmoe) and the selection for balance
        clean_probs_TE = probs_TE if not noisy else F.softmax(clean_logits_TE, dim=-1)
        losses, total = self.standard_losses(
            clean_logits_TE.view(G, S, E),
            clean_probs_TE.view(G, S, E) if self.score_fn == "softmax" else probs_TE.view(G, S, E),
            expert_idx_TK.view(G, S, K),
            noisy_logits_GSE=logits_TE.view(G, S, E) if noisy and self.noise == "gaussian" else None,
            noise_std=sigma,
        )
        return RouterOutput(plan=plan, losses=losses, loss=total, probs_TE=probs_TE)
