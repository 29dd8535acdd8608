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
* ``num_expert_groups`` / ``topk_expert_groups``: group-limited routing (DeepSeek-V2 §2.1.3, DeepSeek-V3 §2.1.2):
  a token picks its experts inside its best groups only (:func:`group_limited_mask`); ``routed_scaling_factor``
  scales the combine weights (DeepSeek-V2/V3); ``renormalize_p`` renormalises by an ``L_p`` norm (DBRX).
* ``expert_capacity``: an absolute capacity per expert and group (Switch Transformers, NLLB-MoE in Hugging Face),
  instead of the relative ``capacity_factor``, which matches a fixed capacity at one group size only.

Which Hugging Face MoE block each setting reproduces, tested against the ``transformers`` module in float64:
:mod:`smoe.interop.hf_families`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from smoe.routing.base import RouterOutput, RoutingContext
from smoe.routing.capacity import capacity_keep_mask, token_choice_keep_mask
from smoe.routing.gated import GatedRouter
from smoe.routing.options import choice, flag, integer, real
from smoe.routing.plan import sparse_plan_from_topk
from smoe.routing.registry import register_router

__all__ = ["TokenChoiceRouter", "top_k_choice", "group_limited_mask"]


def top_k_choice(
    logits_TE: Tensor,
    top_k: int,
    *,
    score_fn: str = "softmax",
    order: str = "softmax_topk",
    renormalize: bool = False,
    selection_bias_E: Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score: str = "top2_sum",
    renormalize_p: float = 1.0,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pure top-k selection.

    Args:
        logits_TE: ``(T, E)`` float32 logits (noise already applied if any).
        top_k: ``K``.
        score_fn: ``"softmax"`` or ``"sigmoid"``.
        order: ``"softmax_topk"`` or ``"topk_softmax"`` (softmax only).
        renormalize: divide the kept weights by their sum.
        selection_bias_E: ``(E,)`` bias added to the scores for the choice only (aux-loss-free balancing).
        num_groups, topk_groups: group-limited routing (DeepSeek-V2 / V3, :func:`group_limited_mask`): the ``E``
            experts form ``num_groups`` contiguous groups, a token keeps its ``topk_groups`` best groups and picks
            its ``K`` experts inside them. ``None``: no groups.
        group_score: how a group is ranked: ``"top2_sum"`` (sum of its two best choice scores, DeepSeek-V3) or
            ``"max"`` (its best score, DeepSeek-V2 ``group_limited_greedy``).
        renormalize_p: with ``renormalize``, divide by the ``L_p`` norm of the kept weights (DBRX's
            ``moe_normalize_expert_weights``); ``1`` is the plain sum.
        scale: multiply the final combine weights (DeepSeek's ``routed_scaling_factor``).

    Returns:
        ``(expert_idx_TK, weight_TK, probs_TE)``: chosen experts, combine weights, and the per-token probability
        vector used for losses and diagnostics.
    """

    def choose(choice_TE: Tensor) -> Tensor:
        if num_groups is not None:
            keep_TE = group_limited_mask(choice_TE, num_groups, topk_groups, group_score)
            choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
        return choice_TE.topk(top_k, dim=-1).indices

    if score_fn == "softmax":
        probs_TE = logits_TE.softmax(dim=-1)
        if order == "softmax_topk":
            expert_idx_TK = choose(probs_TE if selection_bias_E is None else probs_TE + selection_bias_E)
            weight_TK = probs_TE.gather(1, expert_idx_TK)
        elif order == "topk_softmax":
            expert_idx_TK = choose(logits_TE if selection_bias_E is None else logits_TE + selection_bias_E)
            weight_TK = logits_TE.gather(1, expert_idx_TK).softmax(dim=-1)
            renormalize = False  # already sums to one
        else:
            raise ValueError(f"order must be 'softmax_topk' or 'topk_softmax', got {order!r}")
    elif score_fn == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
        expert_idx_TK = choose(scores_TE if selection_bias_E is None else scores_TE + selection_bias_E)
        weight_TK = scores_TE.gather(1, expert_idx_TK)
        # the sigmoids normalised to sum to one, computed as softmax(log sigmoid): the same numbers, but finite
        # (with finite gradients) when every sigmoid of a token underflows to 0 (logits below about -88 in float32)
        probs_TE = F.logsigmoid(logits_TE).softmax(dim=-1)
    else:
        raise ValueError(f"score_fn must be 'softmax' or 'sigmoid', got {score_fn!r}")
    if renormalize:
        if renormalize_p == 1.0:  # the weights are >= 0: their L1 norm is their sum
            norm_T1 = weight_TK.sum(dim=-1, keepdim=True)
        else:
            norm_T1 = torch.linalg.vector_norm(weight_TK, ord=renormalize_p, dim=-1, keepdim=True)
        weight_TK = weight_TK / norm_T1.clamp_min(1e-20)
    if scale != 1.0:
        weight_TK = weight_TK * scale
    return expert_idx_TK, weight_TK, probs_TE


def group_limited_mask(scores_TE: Tensor, num_groups: int, topk_groups: int, group_score: str = "top2_sum") -> Tensor:
    """Which experts a token may choose under group-limited routing (DeepSeek-V2 §2.1.3, DeepSeek-V3 §2.1.2).

    The ``E`` experts form ``num_groups`` contiguous groups of ``E / num_groups`` (the experts of one device or
    node). Each group is ranked by ``group_score`` of the token's choice scores -- ``"top2_sum"``: the sum of its
    two best scores (DeepSeek-V3, Hugging Face ``DeepseekV3TopkRouter``); ``"max"``: its best score (DeepSeek-V2's
    ``group_limited_greedy``) -- and the token keeps its ``topk_groups`` best groups.

    Args:
        scores_TE: ``(T, E)`` choice scores (with the selection bias, if any).
        num_groups: ``n_group``, a divisor of ``E``.
        topk_groups: ``topk_group`` in ``[1, num_groups]``.
        group_score: ``"top2_sum"`` or ``"max"``.

    Returns:
        ``(T, E)`` bool, ``True`` for the experts of the kept groups.
    """
    T, E = scores_TE.shape
    grouped_TGe = scores_TE.view(T, num_groups, E // num_groups)
    if group_score == "top2_sum":
        group_TG = grouped_TGe.topk(min(2, E // num_groups), dim=-1).values.sum(dim=-1)
    elif group_score == "max":
        group_TG = grouped_TGe.max(dim=-1).values
    else:
        raise ValueError(f"group_score must be 'top2_sum' or 'max', got {group_score!r}")
    kept_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    kept_TG.scatter_(1, group_TG.topk(topk_groups, dim=-1).indices, True)
    return kept_TG.unsqueeze(-1).expand(T, num_groups, E // num_groups).reshape(T, E)


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
        num_expert_groups, topk_expert_groups, expert_group_score: group-limited routing (DeepSeek-V2/V3
            ``n_group``, ``topk_group``; :func:`group_limited_mask`); ``None``: off.
        renormalize_p: the ``L_p`` norm ``renormalize`` divides by (DBRX ``moe_normalize_expert_weights``; 1).
        routed_scaling_factor: multiply the combine weights (DeepSeek-V2/V3; 1.0).
        expert_capacity: an *absolute* capacity, in assignments per expert and routing group (Switch Transformers'
            and NLLB-MoE's ``expert_capacity``), instead of the relative ``capacity_factor``; the two exclude each
            other. Placement order as with ``capacity_factor`` (:func:`~smoe.routing.capacity.capacity_keep_mask`).
        balance_count: which choices the balance loss counts when a selection bias is on: ``"routed"`` (default:
            the experts the tokens were sent to) or ``"unbiased"`` (the top-k of the scores without the bias, as
            Hugging Face's ERNIE-4.5 ``load_balancing_loss_func`` does, since it only sees the router logits).
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
        "num_expert_groups": integer(ge=1, none=True),
        "topk_expert_groups": integer(ge=1, none=True),
        "expert_group_score": choice("top2_sum", "max"),
        "renormalize_p": real(gt=0),
        "routed_scaling_factor": real(gt=0),
        "expert_capacity": integer(ge=1, none=True),
        "balance_count": choice("routed", "unbiased"),
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
        num_expert_groups: int | None = None,
        topk_expert_groups: int | None = None,
        expert_group_score: str = "top2_sum",
        renormalize_p: float = 1.0,
        routed_scaling_factor: float = 1.0,
        expert_capacity: int | None = None,
        balance_count: str = "routed",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if expert_capacity is not None and self.capacity_factor is not None:
            raise ValueError(
                f"give capacity_factor={self.capacity_factor} or expert_capacity={expert_capacity}, not both "
                "(a relative or an absolute capacity)"
            )
        if (num_expert_groups is None) != (topk_expert_groups is None):
            raise ValueError(
                "num_expert_groups and topk_expert_groups go together (group-limited routing), got "
                f"num_expert_groups={num_expert_groups!r}, topk_expert_groups={topk_expert_groups!r}"
            )
        if num_expert_groups is not None:
            if self.num_experts % num_expert_groups:
                raise ValueError(f"num_expert_groups={num_expert_groups} must divide num_experts={self.num_experts}")
            if topk_expert_groups > num_expert_groups:
                raise ValueError(
                    f"topk_expert_groups={topk_expert_groups} must be <= num_expert_groups={num_expert_groups}"
                )
            if topk_expert_groups * (self.num_experts // num_expert_groups) < self.top_k:
                raise ValueError(
                    f"topk_expert_groups={topk_expert_groups} groups of {self.num_experts // num_expert_groups} "
                    f"experts hold fewer than top_k={self.top_k} experts"
                )
        self.num_expert_groups, self.topk_expert_groups = num_expert_groups, topk_expert_groups
        self.expert_group_score, self.renormalize_p = expert_group_score, renormalize_p
        self.routed_scaling_factor, self.expert_capacity, self.balance_count = (
            routed_scaling_factor,
            expert_capacity,
            balance_count,
        )
        if score_fn not in ("softmax", "sigmoid"):
            raise ValueError(f"score_fn must be 'softmax' or 'sigmoid', got {score_fn!r}")
        if order not in ("softmax_topk", "topk_softmax"):
            raise ValueError(f"order must be 'softmax_topk' or 'topk_softmax', got {order!r}")
        if noise not in (None, "gaussian", "jitter"):
            raise ValueError(f"noise must be None, 'gaussian' or 'jitter', got {noise!r}")
        if batch_priority and self.capacity_factor is None and expert_capacity is None:
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
        return self.capacity_factor is not None or self.expert_capacity is not None

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
            num_groups=self.num_expert_groups,
            topk_groups=self.topk_expert_groups,
            group_score=self.expert_group_score,
            renormalize_p=self.renormalize_p,
            scale=self.routed_scaling_factor,
        )
        # BPR priority: the token's top-1 gate (noisy in training, as in vmoe), whatever the order
        priority_GS = probs_TE.max(dim=-1).values.view(G, S) if self.batch_priority else None
        if self.capacity_factor is None and self.expert_capacity is not None:  # an absolute capacity
            keep_TK = capacity_keep_mask(expert_idx_TK.view(G, S, K), self.expert_capacity, E, priority_GS).view(T, K)
        else:
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
        balance_idx_TK = expert_idx_TK
        if self.balance_count == "unbiased" and self.expert_bias_E is not None:
            # the top-k without the selection bias (what HF's ERNIE-4.5 aux loss counts)
            balance_idx_TK, _, _ = top_k_choice(
                logits_TE,
                K,
                score_fn=self.score_fn,
                order=self.order,
                num_groups=self.num_expert_groups,
                topk_groups=self.topk_expert_groups,
                group_score=self.expert_group_score,
            )
        # losses use the clean probabilities for importance (vmoe) and the selection for balance; the GShard
        # balance loss takes the (noisy) gates the router chose with, as vmoe (routed_probs_GSE)
        clean_probs_TE = probs_TE if not noisy else F.softmax(clean_logits_TE, dim=-1)
        losses, total = self.standard_losses(
            clean_logits_TE.view(G, S, E),
            clean_probs_TE.view(G, S, E) if self.score_fn == "softmax" else probs_TE.view(G, S, E),
            balance_idx_TK.view(G, S, K),
            noisy_logits_GSE=logits_TE.view(G, S, E) if noisy and self.noise == "gaussian" else None,
            noise_std=sigma,
            routed_probs_GSE=probs_TE.view(G, S, E),
        )
        return RouterOutput(plan=plan, losses=losses, loss=total, probs_TE=probs_TE)
