"""The reference engine: the specification of what running a routing plan means, and the test oracle.

Plain per-expert loops over the plan with ordinary autograd; nothing here is tuned, and nothing here may be
removed (house style rule 9). The fast engine must agree with it on outputs and on every gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from smoe.routing.plan import DensePlan, SparsePlan

if TYPE_CHECKING:  # experts are parameters only; importing them here would be circular
    from smoe.layers.experts import Experts

__all__ = ["run_sparse_reference", "run_dense_reference"]


def run_sparse_reference(x_RD: Tensor, plan: SparsePlan, experts: Experts) -> Tensor:
    """``y[t] = sum_{rows n with token t} weight[n] * f_{expert[n]}(x[source[n]])``; ``(R, D) -> (T, D)``.

    Does not rely on the rows being sorted.
    """
    y_TD = x_RD.new_zeros(plan.num_tokens, x_RD.shape[1])
    src_N = plan.gather_idx_N
    weight_N = plan.weight_N.to(x_RD.dtype)
    for e in range(experts.num_experts):
        rows = (plan.expert_idx_N == e).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        h_MD = experts.expert_forward(e, x_RD[src_N[rows]])
        y_TD = y_TD.index_add(0, plan.token_idx_N[rows], weight_N[rows].unsqueeze(1) * h_MD)
    return y_TD


def run_dense_reference(x_TD: Tensor, plan: DensePlan, experts: Experts) -> Tensor:
    """Soft-MoE execution (vmoe ``EinsumDispatcher``), one expert at a time; ``(T, D) -> (T, D)``.

    ``slots[g, e, c] = sum_s D[g, s, e, c] x[g, s]``, ``out[g, e, c] = f_e(slots[g, e, c])``,
    ``y[g, s] = sum_{e, c} C[g, s, e, c] out[g, e, c]``.
    """
    G, S, E, C = plan.dispatch_GSEC.shape
    x_GSD = x_TD.view(G, S, -1)
    dispatch = plan.dispatch_GSEC.to(x_TD.dtype)
    combine = plan.combine_GSEC.to(x_TD.dtype)
    y_GSD = torch.zeros_like(x_GSD)
    for e in range(E):
        slots_GCD = torch.einsum("gsc,gsd->gcd", dispatch[:, :, e], x_GSD)
        out_GCD = experts.expert_forward(e, slots_GCD.reshape(G * C, -1)).view(G, C, -1)
        y_GSD = y_GSD + torch.einsum("gsc,gcd->gsd", combine[:, :, e], out_GCD)
    return y_GSD.reshape(G * S, -1)
