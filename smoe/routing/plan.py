"""Routing plans: the one value every router returns and the engine consumes.

A router decides *who goes where*; the engine (``smoe.engine``) moves tokens to experts and back. The two meet
only here. There are two forms, after the dispatch/combine formulation of vmoe's ``EinsumDispatcher`` and of
"Routers in Vision Mixture of Experts" (Liu et al., TMLR 2024), reference §1:

* :class:`SparsePlan` -- hard assignments. Flat assignment rows ``(source row, token, expert, combine weight)``
  sorted by expert, with per-expert counts. A dropped assignment (capacity overflow) is simply absent, so a token
  whose every assignment is dropped gets ``y = 0`` and passes through the residual only.
* :class:`DensePlan` -- soft assignments to expert slots (Soft MoE). ``dispatch_GSEC`` mixes the tokens of each
  group into slots, ``combine_GSEC`` mixes slot outputs back into tokens.

Shape legend (shape suffixes on every tensor name, after Noam Shazeer's "shape suffixes" note):

====  ==========================================================================
T     tokens entering the layer (flattened ``B*T`` of a batch), in routing-group order
D     model width
E     experts
K     experts chosen per token (``top_k``)
N     assignment rows kept in a sparse plan (``<= T*K`` for token choice)
G     routing groups; ``S`` tokens per group, ``T = G*S``
C     slots (buffer rows) per expert and group, in a dense plan
R     rows of the engine input; ``R = T`` except for routers that add rows (S2MoE's noisy copy)
====  ==========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SparsePlan", "DensePlan", "RoutingPlan", "sparse_plan_from_topk"]


@dataclass(frozen=True, kw_only=True)
class SparsePlan:
    """Hard token -> expert assignments, grouped by expert.

    Row ``n`` says: take engine input row ``source_idx_N[n]``, run it through expert ``expert_idx_N[n]``, scale the
    result by ``weight_N[n]`` and add it to output token ``token_idx_N[n]``. Rows are sorted by expert (ascending),
    so expert ``e`` owns the contiguous rows ``offsets[e]:offsets[e+1]`` with ``offsets = [0, cumsum(counts_E)]``.

    Attributes:
        token_idx_N: ``(N,)`` int64, output token of each row, in ``[0, num_tokens)``.
        expert_idx_N: ``(N,)`` int64, expert of each row, non-decreasing.
        weight_N: ``(N,)`` float, combine weight (differentiable: gradients flow back to the router).
        counts_E: ``(E,)`` int64, rows per expert; ``counts_E.sum() == N``.
        num_tokens: ``T``, number of output tokens.
        num_requested: assignments the router asked for before capacity dropping (``T*K`` for token choice);
            ``1 - N / num_requested`` is the drop rate.
        source_idx_N: ``(N,)`` int64 row of the engine input to read, or ``None`` for ``token_idx_N``.
    """

    token_idx_N: Tensor
    expert_idx_N: Tensor
    weight_N: Tensor
    counts_E: Tensor
    num_tokens: int
    num_requested: int
    source_idx_N: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.counts_E.numel()

    @property
    def num_rows(self) -> int:
        return self.token_idx_N.numel()

    @property
    def gather_idx_N(self) -> Tensor:
        """Rows of the engine input that the assignments read."""
        return self.token_idx_N if self.source_idx_N is None else self.source_idx_N

    def validate(self) -> None:
        """Check the plan's invariants; raises ``ValueError`` on a malformed plan (used by the contract tests)."""
        N = self.token_idx_N.numel()
        for name in ("expert_idx_N", "weight_N"):
            if getattr(self, name).shape != (N,):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected ({N},)")
        if int(self.counts_E.sum()) != N:
            raise ValueError(f"counts_E sums to {int(self.counts_E.sum())}, expected N={N}")
        if N and bool((self.expert_idx_N[1:] < self.expert_idx_N[:-1]).any()):
            raise ValueError("expert_idx_N must be sorted by expert")
        if N and (int(self.token_idx_N.min()) < 0 or int(self.token_idx_N.max()) >= self.num_tokens):
            raise ValueError(f"token_idx_N out of range [0, {self.num_tokens})")
        expected = torch.bincount(self.expert_idx_N, minlength=self.num_experts)
        if not torch.equal(expected.to(self.counts_E), self.counts_E):
            raise ValueError("counts_E disagrees with expert_idx_N")
        if not bool(torch.isfinite(self.weight_N).all()):
            raise ValueError("weight_N holds non-finite values")


@dataclass(frozen=True, kw_only=True)
class DensePlan:
    """Soft assignments of tokens to expert slots (Soft MoE, Puigcerver et al., ICLR 2024, eqs. 1-3).

    Per group ``g``: slot input ``x~[g,e,c] = sum_s dispatch_GSEC[g,s,e,c] * x[g,s]``; expert ``e`` processes
    its slots; token output ``y[g,s] = sum_{e,c} combine_GSEC[g,s,e,c] * f_e(x~[g,e,c])``.

    Attributes:
        dispatch_GSEC: ``(G, S, E, C)`` dispatch weights (for Soft MoE, softmax over ``S``).
        combine_GSEC: ``(G, S, E, C)`` combine weights (for Soft MoE, softmax over ``(E, C)``).
    """

    dispatch_GSEC: Tensor
    combine_GSEC: Tensor

    @property
    def num_experts(self) -> int:
        return self.dispatch_GSEC.shape[2]

    @property
    def num_tokens(self) -> int:
        G, S = self.dispatch_GSEC.shape[:2]
        return G * S

    def validate(self) -> None:
        if self.dispatch_GSEC.dim() != 4 or self.dispatch_GSEC.shape != self.combine_GSEC.shape:
            raise ValueError(
                f"dispatch_GSEC {tuple(self.dispatch_GSEC.shape)} and combine_GSEC "
                f"{tuple(self.combine_GSEC.shape)} must be equal 4-d shapes (G, S, E, C)"
            )
        for name in ("dispatch_GSEC", "combine_GSEC"):
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise ValueError(f"{name} holds non-finite values")


RoutingPlan = SparsePlan | DensePlan


def sparse_plan_from_topk(
    expert_idx_TK: Tensor,
    weight_TK: Tensor,
    num_experts: int,
    keep_TK: Tensor | None = None,
) -> SparsePlan:
    """Build a :class:`SparsePlan` from per-token choices (token choice and its variants).

    Args:
        expert_idx_TK: ``(T, K)`` int64 chosen experts.
        weight_TK: ``(T, K)`` combine weights.
        num_experts: ``E``.
        keep_TK: optional ``(T, K)`` bool mask; ``False`` marks an assignment dropped by capacity.

    Returns:
        The plan, rows sorted by expert and, within an expert, by token (a stable sort of the token-major rows).
    """
    T, K = expert_idx_TK.shape
    expert_flat = expert_idx_TK.reshape(-1)
    weight_flat = weight_TK.reshape(-1)
    token_flat = torch.arange(T, device=expert_idx_TK.device).repeat_interleave(K)
    if keep_TK is not None:
        kept = keep_TK.reshape(-1).nonzero().squeeze(1)
        expert_flat, weight_flat, token_flat = expert_flat[kept], weight_flat[kept], token_flat[kept]
    order = torch.argsort(expert_flat, stable=True)
    expert_sorted = expert_flat[order]
    return SparsePlan(
        token_idx_N=token_flat[order],
        expert_idx_N=expert_sorted,
        weight_N=weight_flat[order],
        counts_E=torch.bincount(expert_sorted, minlength=num_experts),
        num_tokens=T,
        num_requested=T * K,
    )
