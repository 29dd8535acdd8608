"""The token-movement ops of the local dispatcher, each an autograd op whose backward is the dual op.

* :func:`gather_rows` -- ``x[idx]`` (dispatch); backward is a scatter-add.
* :func:`scatter_add_weighted` -- ``y[idx[n]] += w[n] * h[n]`` (combine); backward is a gather, and the weight
  gradient ``<grad_y[idx[n]], h[n]>`` without materialising ``w * h``.

The experts' own GEMMs live with the experts (:mod:`smoe.experts.grouped`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gather_rows", "scatter_add_weighted"]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: Tensor, idx_N: Tensor) -> Tensor:
        ctx.save_for_backward(idx_N)
        ctx.num_rows = x_TD.shape[0]
        return x_TD.index_select(0, idx_N)

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        (idx_N,) = ctx.saved_tensors
        grad_TD = grad_ND.new_zeros(ctx.num_rows, grad_ND.shape[1])
        grad_TD.index_add_(0, idx_N, grad_ND)
        return grad_TD, None


class _ScatterAddWeighted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: Tensor, weight_N: Tensor, idx_N: Tensor, num_rows: int) -> Tensor:
        ctx.save_for_backward(h_ND, weight_N, idx_N)
        y_TD = h_ND.new_zeros(num_rows, h_ND.shape[1])
        y_TD.index_add_(0, idx_N, h_ND * weight_N.unsqueeze(1))
        return y_TD

    @staticmethod
    def backward(ctx, grad_TD: Tensor):
        h_ND, weight_N, idx_N = ctx.saved_tensors
        grad_rows_ND = grad_TD.index_select(0, idx_N)
        grad_h = grad_rows_ND * weight_N.unsqueeze(1) if ctx.needs_input_grad[0] else None
        grad_w = (grad_rows_ND * h_ND).sum(dim=1) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


def gather_rows(x_TD: Tensor, idx_N: Tensor) -> Tensor:
    """``x_TD[idx_N]`` with a scatter-add backward."""
    return _GatherRows.apply(x_TD, idx_N)


def scatter_add_weighted(h_ND: Tensor, weight_N: Tensor, idx_N: Tensor, num_rows: int) -> Tensor:
    """``y = zeros(num_rows, D); y[idx_N[n]] += weight_N[n] * h_ND[n]``, differentiable in ``h`` and ``weight``."""
    return _ScatterAddWeighted.apply(h_ND, weight_N, idx_N, num_rows)
