"""The fast dropless engine: sorted rows, grouped GEMMs, fused weighted scatter (MegaBlocks-style, no padding).

Sparse plan, for ``N`` rows sorted by expert (the plan guarantees the order):

1. ``x_ND = gather_rows(x, source_idx_N)``                    -- dispatch, one index_select
2. ``h = act(grouped(x_ND, w1), grouped(x_ND, w3))``           -- one grouped GEMM per projection over all experts
3. ``o_ND = grouped(h, w2)``
4. ``y = scatter_add_weighted(o_ND, weight_N, token_idx_N)``   -- combine, weight multiply fused into the scatter

No capacity padding and no ``(T, E, C)`` one-hot: cost is ``O(N D F)`` in the GEMMs plus ``O(N D)`` in the moves,
the same as a dense MLP over ``N`` rows (the "dense-equivalent").

SwiGLU experts without biases (the default expert) run steps 1-4 as one fused autograd op,
:func:`smoe.engine.fused.swiglu_experts`, with a hand-written backward that keeps the per-expert work in cache
(see that module for why and for the measurements). GELU experts and experts with biases run the modular ops of
:mod:`smoe.engine.ops` above; both paths compute the same thing and are checked against the reference engine.

Dense plan (Soft MoE): the slot mixing is two batched GEMMs (einsum), the experts one grouped GEMM over
``E`` equal segments of ``G*C`` slots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from smoe.engine.backend import choose_kernel
from smoe.engine.fused import swiglu_experts
from smoe.engine.ops import gather_rows, grouped_linear, scatter_add_weighted, segment_offsets
from smoe.routing.plan import DensePlan, SparsePlan

if TYPE_CHECKING:  # experts are parameters only; importing them here would be circular
    from smoe.layers.experts import Experts

__all__ = ["run_sparse_fast", "run_dense_fast", "experts_on_sorted_rows"]


def experts_on_sorted_rows(
    x_ND: Tensor, counts_E: Tensor, expert_idx_N: Tensor, experts: Experts, kernel: str
) -> Tensor:
    """Run every expert on its contiguous segment of ``x_ND``; ``(N, D) -> (N, D)``."""
    kernel = choose_kernel(kernel, x_ND, experts.w1_EFD, experts.w2_EDF)
    if _fusable(experts):
        return swiglu_experts(x_ND, experts.w1_EFD, experts.w3_EFD, experts.w2_EDF, counts_E, kernel)
    offs = segment_offsets(counts_E) if kernel == "grouped_mm" else None
    counts = counts_E.tolist() if kernel == "loop" else None
    h1 = grouped_linear(x_ND, experts.w1_EFD, counts_E, kernel, offs, counts)
    if experts.b1_EF is not None:
        h1 = h1 + experts.b1_EF.index_select(0, expert_idx_N)
    h3 = grouped_linear(x_ND, experts.w3_EFD, counts_E, kernel, offs, counts) if experts.w3_EFD is not None else None
    out = grouped_linear(experts.activate(h1, h3), experts.w2_EDF, counts_E, kernel, offs, counts)
    if experts.b2_ED is not None:
        out = out + experts.b2_ED.index_select(0, expert_idx_N)
    return out


def _fusable(experts: Experts) -> bool:
    return experts.activation == "swiglu" and experts.b1_EF is None and experts.b2_ED is None


def run_sparse_fast(x_RD: Tensor, plan: SparsePlan, experts: Experts, kernel: str = "auto") -> Tensor:
    """Execute a sparse plan; ``(R, D) -> (T, D)``. Rows must be sorted by expert (``SparsePlan`` invariant)."""
    if _fusable(experts):
        return swiglu_experts(
            x_RD,
            experts.w1_EFD,
            experts.w3_EFD,
            experts.w2_EDF,
            plan.counts_E,
            choose_kernel(kernel, x_RD, experts.w1_EFD, experts.w2_EDF),
            source_idx_N=plan.gather_idx_N,
            token_idx_N=plan.token_idx_N,
            weight_N=plan.weight_N.to(x_RD.dtype),
            num_tokens=plan.num_tokens,
        )
    x_ND = gather_rows(x_RD, plan.gather_idx_N)
    out_ND = experts_on_sorted_rows(x_ND, plan.counts_E, plan.expert_idx_N, experts, kernel)
    return scatter_add_weighted(out_ND, plan.weight_N.to(x_RD.dtype), plan.token_idx_N, plan.num_tokens)


def run_dense_fast(x_TD: Tensor, plan: DensePlan, experts: Experts, kernel: str = "auto") -> Tensor:
    """Execute a dense (Soft-MoE) plan with batched slot mixing and one grouped expert GEMM; ``(T, D) -> (T, D)``."""
    G, S, E, C = plan.dispatch_GSEC.shape
    x_GSD = x_TD.view(G, S, -1)
    slots_EGCD = torch.einsum("gsec,gsd->egcd", plan.dispatch_GSEC.to(x_TD.dtype), x_GSD)
    rows = G * C
    counts_E = torch.full((E,), rows, dtype=torch.long, device=x_TD.device)
    expert_idx_N = torch.arange(E, device=x_TD.device).repeat_interleave(rows)
    out_ND = experts_on_sorted_rows(slots_EGCD.reshape(E * rows, -1), counts_E, expert_idx_N, experts, kernel)
    out_EGCD = out_ND.view(E, G, C, -1)
    y_GSD = torch.einsum("gsec,egcd->gsd", plan.combine_GSEC.to(x_TD.dtype), out_EGCD)
    return y_GSD.reshape(G * S, -1)
