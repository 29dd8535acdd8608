"""Graph-of-tokens routing: similarity-aware and attention-aware token choice (Nguyen, Tran, Nguyen, Baraniuk,
"Improving Routing in Sparse Mixture of Experts with Graph of Tokens", arXiv 2505.00792), reference §3.3.

Softmax routing picks each token's experts independently of the other tokens; the paper argues (through a
probabilistic graphical model) that this independence causes late-training routing fluctuation, and lets a token's
expert distribution borrow from similar tokens. We implement the reading of reference §3.3.3, in which token ``i``
first picks a neighbour ``j`` with probability ``M[i, j]`` and then inherits ``j``'s expert distribution::

    p_t      = softmax(z_t),  z = x W_r^T                        # (T, E) router probabilities
    p~_i     = a * p_i + (1 - a) * sum_j M[i, j] p_j              # M row-stochastic (rows sum to one)
    experts  = top-K of p~_i;  weights = p~ at those experts, renormalised over the K (reference §3.3.3 sketch)

* **Similarity-aware** (``"similarity"``): ``M = softmax_j(cos(x_i W_s, x_j W_s) / tau)`` over the tokens of the
  *routing group* (``W_s`` = identity by default). The graph is scoped to the group so that the layer's causal
  machinery applies: with ``group_mode="sequence"`` it is the per-sequence graph of the paper; with
  ``causal=True`` an edge ``i -> j`` exists only when ``j`` is at the same or an earlier position of its sequence,
  which is causal-safe in every group mode. An unmasked graph (``causal=False``, the default, for encoders) makes
  a token's routing depend on later tokens, so it ``couples_tokens`` and a causal layer refuses it except in
  ``group_mode="position"`` (where the group holds one token per sequence, all at the same position).
* **Attention-aware** (``"attention_aware"``): ``M`` = the preceding attention layer's probabilities averaged over
  heads, ``(B, H, L, L)`` or ``(B, L, L)``, handed to ``MoE.forward(attn_probs=...)`` by the block
  (:mod:`smoe.models.block` reads ``needs_attention_probs``). ``M`` relates tokens of one *sequence*, in the
  model's ``(batch, position)`` order, while the router sees tokens in routing-group order, so the router maps its
  probabilities to ``(B, L, E)`` (undoing the layer's ``(L, B)`` permutation in ``group_mode="position"``), mixes,
  and maps back. A causal (lower-triangular) attention matrix keeps the routing causal for free; the router adds
  no coupling of its own beyond what the attention already has, so ``couples_tokens`` is ``False`` (with a
  non-causal encoder attention, routing depends on the whole sequence exactly as that attention does).

What is **unconfirmed** (reference §3.3.3, §13; no official code is known): the exact formulas. Mixing in
probability space vs logit space (``mix="probs"`` default / ``"logits"``), the residual weight ``a``
(``self_weight``, default 0), cosine similarity with ``tau = 0.1`` and ``W_s`` = identity are our choices, made
because raw dot products of un-normalised states make ``M`` nearly the identity. Renormalising the K weights
follows the reference sketch.

Shape legend: ``T`` tokens in routing order, ``G`` groups of ``S``, ``B`` sequences of ``L`` positions, ``H``
heads, ``E`` experts, ``K`` top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe.routing.base import RouterOutput, RoutingContext
from smoe.routing.capacity import token_choice_keep_mask
from smoe.routing.gated import GatedRouter
from smoe.routing.options import MIN_SCALE, choice, flag, integer, real
from smoe.routing.plan import sparse_plan_from_topk
from smoe.routing.registry import register_router

__all__ = [
    "SimilarityAwareRouter",
    "AttentionAwareRouter",
    "positions_in_sequence",
    "similarity_matrix",
    "attention_matrix",
    "to_sequence_order",
    "from_sequence_order",
]


def positions_in_sequence(ctx: RoutingContext, num_tokens: int, device=None) -> Tensor:
    """``(T,)`` position of every routing-order token inside its sequence (``(L, B)`` order in position mode)."""
    B, L = ctx.batch_shape
    if B * L != num_tokens:
        raise ValueError(f"batch_shape {ctx.batch_shape} does not cover {num_tokens} tokens")
    t_T = torch.arange(num_tokens, device=device)
    return t_T // B if ctx.group_mode == "position" else t_T % L


def similarity_matrix(feat_GSD: Tensor, temperature: float, pos_GS: Tensor | None = None) -> Tensor:
    """Row-stochastic similarity graph ``M = softmax_j(cos(f_i, f_j) / tau)`` inside each group.

    Args:
        feat_GSD: ``(G, S, D)`` token features.
        temperature: ``tau > 0``.
        pos_GS: ``(G, S)`` positions in the sequence; when given, ``M[i, j] = 0`` for ``pos[j] > pos[i]``
            (causal mask; the diagonal is always kept, so no row is empty).

    Returns:
        ``(G, S, S)`` with rows summing to one.
    """
    f_GSD = F.normalize(feat_GSD.float(), dim=-1)
    sim_GSS = f_GSD @ f_GSD.transpose(1, 2) / temperature
    if pos_GS is not None:
        future_GSS = pos_GS.unsqueeze(1) > pos_GS.unsqueeze(2)  # [g, i, j]: token j is later than token i
        sim_GSS = sim_GSS.masked_fill(future_GSS, float("-inf"))
    return sim_GSS.softmax(dim=-1)


def attention_matrix(attn_probs: Tensor, batch_shape: tuple[int, int]) -> Tensor:
    """Head-averaged, row-normalised attention ``(B, L, L)`` from ``(B, H, L, L)``, ``(B, L, L)`` or ``(L, L)``.

    Rows are renormalised (attention dropout or a bf16 cast can break their sums), so the result is exactly
    row-stochastic. Raises ``ValueError`` when the shape does not match the layer input's ``(B, L)``.
    """
    B, L = batch_shape
    a = attn_probs.float()
    if a.dim() == 2 and B == 1:
        a = a.unsqueeze(0)
    if a.dim() == 4:
        a = a.mean(dim=1)  # average over heads (reference §3.3.3)
    if a.shape != (B, L, L):
        raise ValueError(
            f"attn_probs has shape {tuple(attn_probs.shape)}; expected (B, H, L, L) or (B, L, L) with "
            f"(B, L) = {(B, L)} of the MoE input"
        )
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise ValueError("attn_probs must be finite, non-negative attention probabilities (got NaN, Inf or < 0)")
    return a / a.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def to_sequence_order(v_TE: Tensor, ctx: RoutingContext) -> Tensor:
    """Routing-order rows ``(T, E)`` -> ``(B, L, E)`` in the model's (batch, position) order."""
    B, L = ctx.batch_shape
    if ctx.group_mode == "position":  # the layer grouped (B, L) -> (L, B)
        return v_TE.view(L, B, -1).transpose(0, 1)
    return v_TE.view(B, L, -1)


def from_sequence_order(v_BLE: Tensor, ctx: RoutingContext) -> Tensor:
    """Inverse of :func:`to_sequence_order`: ``(B, L, E)`` -> ``(T, E)`` in routing order."""
    B, L = ctx.batch_shape
    if ctx.group_mode == "position":
        return v_BLE.transpose(0, 1).reshape(B * L, -1)
    return v_BLE.reshape(B * L, -1)


class _GraphRouter(GatedRouter):
    """Token choice on graph-mixed scores; subclasses provide :meth:`mix` (the ``sum_j M[i, j] v_j`` product).

    Args (beyond :class:`~smoe.routing.gated.GatedRouter`):
        self_weight: ``a``, the weight of the token's own distribution (0: pure graph mixing; unconfirmed).
        mix: ``"probs"`` (mix the softmax probabilities) or ``"logits"`` (mix logits, then softmax).
        renormalize: renormalise the K selected weights to sum to one.
        capacity_multiple_of: with a ``capacity_factor``, round the per-expert capacity up to a multiple of this
            (:func:`~smoe.routing.capacity.compute_capacity`); default 1, vmoe's default is 4.
    """

    capacity_options = frozenset({"capacity_factor"})

    OPTIONS = {
        "self_weight": real(ge=0, le=1),
        "mix": choice("probs", "logits"),
        "renormalize": flag(),
        "capacity_multiple_of": integer(ge=1),
    }

    def __init__(
        self,
        *,
        self_weight: float = 0.0,
        mix: str = "probs",
        renormalize: bool = True,
        capacity_multiple_of: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.capacity_multiple_of = capacity_multiple_of
        if not 0.0 <= self_weight <= 1.0:
            raise ValueError(f"self_weight must be in [0, 1], got {self_weight!r}")
        if mix not in ("probs", "logits"):
            raise ValueError(f"mix must be 'probs' or 'logits', got {mix!r}")
        self.self_weight, self.mix_space, self.renormalize = self_weight, mix, renormalize

    def mix(self, v_TE: Tensor, x_TD: Tensor, ctx: RoutingContext) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        S = ctx.group_size
        G = T // S
        logits_TE = self.logits(x_TD)
        a = self.self_weight
        if self.mix_space == "probs":
            p_TE = logits_TE.softmax(dim=-1)
            probs_TE = a * p_TE + (1.0 - a) * self.mix(p_TE, x_TD, ctx)
        else:
            probs_TE = (a * logits_TE + (1.0 - a) * self.mix(logits_TE, x_TD, ctx)).softmax(dim=-1)
        weight_TK, expert_idx_TK = probs_TE.topk(K, dim=-1)
        if self.renormalize:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        keep_TK = token_choice_keep_mask(
            expert_idx_TK, S, E, self.capacity_factor, multiple_of=self.capacity_multiple_of
        )
        plan = sparse_plan_from_topk(expert_idx_TK, weight_TK, E, keep_TK)
        losses, total = self.standard_losses(
            logits_TE.view(G, S, E), probs_TE.view(G, S, E), expert_idx_TK.view(G, S, K)
        )
        return RouterOutput(plan=plan, losses=losses, loss=total, probs_TE=probs_TE)


@register_router("similarity")
class SimilarityAwareRouter(_GraphRouter):
    """Similarity-aware routing over the routing group (module docstring).

    Args (beyond :class:`_GraphRouter`):
        causal: mask edges to later positions (causal-safe in every group mode).
        temperature: ``tau`` of the cosine-similarity softmax (0.1; unconfirmed).
        sim_dim: width of a learned projection ``W_s`` (``None``: identity, no extra parameters).
    """

    OPTIONS = {"causal": flag(), "temperature": real(ge=MIN_SCALE), "sim_dim": integer(ge=1, none=True)}

    def __init__(
        self,
        *,
        causal: bool = False,
        temperature: float = 0.1,
        sim_dim: int | None = None,
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        super().__init__(device=device, dtype=dtype, **kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if sim_dim is not None and (not isinstance(sim_dim, int) or sim_dim < 1):
            raise ValueError(f"sim_dim must be None or a positive integer, got {sim_dim!r}")
        self.causal, self.temperature = causal, temperature
        self.sim_proj = (
            nn.Linear(self.dim, sim_dim, bias=False, device=device, dtype=dtype) if sim_dim is not None else None
        )

    @property
    def couples_tokens(self) -> bool:  # type: ignore[override]
        # an unmasked graph (or capacity) lets later tokens change an earlier token's routing
        return not self.causal or self.capacity_factor is not None

    def mixing_matrix(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        """``(G, S, S)`` row-stochastic similarity graph of each routing group."""
        T, S = x_TD.shape[0], ctx.group_size
        feat_TD = x_TD if self.sim_proj is None else self.sim_proj(x_TD)
        pos_GS = positions_in_sequence(ctx, T, x_TD.device).view(T // S, S) if self.causal else None
        return similarity_matrix(feat_TD.reshape(T // S, S, -1), self.temperature, pos_GS)

    def mix(self, v_TE: Tensor, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        T, S = v_TE.shape[0], ctx.group_size
        M_GSS = self.mixing_matrix(x_TD, ctx)
        return (M_GSS @ v_TE.view(T // S, S, -1)).reshape(T, -1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, causal={self.causal}, temperature={self.temperature}"


@register_router("attention_aware")
class AttentionAwareRouter(_GraphRouter):
    """Attention-aware routing: mix the router probabilities through the preceding attention (module docstring).

    Needs ``MoE.forward(..., attn_probs=...)``; a missing matrix raises ``ValueError``.
    """

    #: the transformer block hands this router the attention probabilities of its attention layer
    needs_attention_probs = True

    @property
    def couples_tokens(self) -> bool:  # type: ignore[override]
        return self.capacity_factor is not None

    def mixing_matrix(self, ctx: RoutingContext) -> Tensor:
        """``(B, L, L)`` row-stochastic head-averaged attention."""
        if ctx.attn_probs is None:
            raise ValueError(
                "router 'attention_aware' needs the preceding attention probabilities: call "
                "MoE.forward(x, attn_probs=...) with (B, H, L, L) or (B, L, L) probabilities"
            )
        return attention_matrix(ctx.attn_probs, ctx.batch_shape)

    def mix(self, v_TE: Tensor, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        A_BLL = self.mixing_matrix(ctx).to(v_TE.device)
        return from_sequence_order(A_BLL @ to_sequence_order(v_TE, ctx), ctx)
