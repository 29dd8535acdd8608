"""The reference engine: the specification of what running a routing plan means, and the test oracle.

Plain per-expert loops over the plan with ordinary autograd, calling each expert's own definition
(:meth:`smoe.experts.Experts.expert_forward`); nothing here is tuned, and nothing here may be removed (house style
rule 9). The dispatchers and the experts' fast paths must agree with it on outputs and on every gradient. Expert
outputs may have any trailing shape (``(M, *out)``); the combine works on their flattened rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.experts.base import Experts
from smoe.routing.plan import DensePlan, SparsePlan

__all__ = ["run_sparse_reference", "run_dense_reference"]


def run_sparse_reference(x_RD: Tensor, plan: SparsePlan, experts: Experts) -> Tensor:
    """``y[t] = sum_{rows n with token t} weight[n] * f_{expert[n]}(x[source[n]])``; ``(R, D) -> (T, *out)``.

    Does not rely on the rows being sorted.
    """
    src_N = plan.gather_idx_N
    weight_N = plan.weight_N.to(x_RD.dtype)
    y_TO: Tensor | None = None
    out_shape: tuple[int, ...] = ()
    for e in range(experts.num_experts):
        rows = (plan.expert_idx_N == e).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        h = experts.expert_forward(e, x_RD[src_N[rows]])
        out_shape = tuple(h.shape[1:])
        h_MO = h.reshape(h.shape[0], -1)
        if y_TO is None:
            y_TO = h_MO.new_zeros(plan.num_tokens, h_MO.shape[1])
        y_TO = y_TO.index_add(0, plan.token_idx_N[rows], weight_N[rows].unsqueeze(1) * h_MO)
    if y_TO is None:  # nothing routed: the experts' output shape from a call on no rows
        h = experts.expert_forward(0, x_RD[:0])
        return h.new_zeros(plan.num_tokens, *h.shape[1:])
    return y_TO.view(plan.num_tokens, *out_shape)


def run_dense_reference(x_TD: Tensor, plan: DensePlan, experts: Experts) -> Tensor:
    """Soft-MoE execution (vmoe ``EinsumDispatcher``), one expert at a time; ``(T, D) -> (T, *out)``.

    ``slots[g, e, c] = sum_s D[g, s, e, c] x[g, s]``, ``out[g, e, c] = f_e(slots[g, e, c])``,
    ``y[g, s] = sum_{e, c} C[g, s, e, c] out[g, e, c]``.
    """
    G, S, E, C = plan.dispatch_GSEC.shape
    x_GSD = x_TD.view(G, S, -1)
    dispatch = plan.dispatch_GSEC.to(x_TD.dtype)
    combine = plan.combine_GSEC.to(x_TD.dtype)
    y_GSO: Tensor | float = 0.0
    out_shape: tuple[int, ...] = ()
    for e in range(E):
        slots_GCD = torch.einsum("gsc,gsd->gcd", dispatch[:, :, e], x_GSD)
        h = experts.expert_forward(e, slots_GCD.reshape(G * C, -1))
        out_shape = tuple(h.shape[1:])
        y_GSO = y_GSO + torch.einsum("gsc,gco->gso", combine[:, :, e], h.reshape(G, C, -1))
    return y_GSO.reshape(G * S, *out_shape)
