"""Autograd ops of the fast engine, each with its backward written as the dual op.

* :func:`gather_rows` -- ``x[idx]`` (dispatch); backward is a scatter-add.
* :func:`scatter_add_weighted` -- ``y[idx[n]] += w[n] * h[n]`` (combine); backward is a gather, and the weight
  gradient ``<grad_y[idx[n]], h[n]>`` without materialising ``w * h``.
* :func:`grouped_linear` -- ``h[rows of e] = x[rows of e] @ W[e]^T`` for row segments sorted by expert, with
  ``torch._grouped_mm`` forward and backward, or a per-expert ``mm`` loop writing into one output (and, in the
  backward, into one weight-gradient tensor from :mod:`smoe.engine.buffers`).

These are the building blocks for GELU / biased experts and the dense plan's GELU experts; the default SwiGLU
experts run the fused op of :mod:`smoe.engine.fused`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.engine.buffers import empty_grad

__all__ = ["gather_rows", "scatter_add_weighted", "grouped_linear", "segment_offsets"]


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


def segment_offsets(counts_E: Tensor) -> Tensor:
    """int32 end offsets ``cumsum(counts_E)`` in the form ``torch._grouped_mm`` expects."""
    return torch.cumsum(counts_E, 0).to(torch.int32)


class _GroupedLinearMM(torch.autograd.Function):
    """Grouped ``x @ W[e]^T`` with ``torch._grouped_mm`` in both directions."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, w_EOI: Tensor, offs_E: Tensor) -> Tensor:
        ctx.save_for_backward(x_ND, w_EOI, offs_E)
        return torch._grouped_mm(x_ND, w_EOI.transpose(-2, -1), offs=offs_E)

    @staticmethod
    def backward(ctx, grad_NO: Tensor):
        x_ND, w_EOI, offs_E = ctx.saved_tensors
        grad_NO = grad_NO.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_NO, w_EOI, offs=offs_E)  # (N, O) @ (E, O, I) -> (N, I)
        if ctx.needs_input_grad[1]:
            # per segment: grad_O^T @ x -> (E, O, I); empty segments give zeros
            grad_w = torch._grouped_mm(grad_NO.t(), x_ND, offs=offs_E)
        return grad_x, grad_w, None


class _GroupedLinearLoop(torch.autograd.Function):
    """Grouped ``x @ W[e]^T`` with one ``mm`` per non-empty expert, written into one output (no ``cat``).

    The backward writes ``grad_x`` and the ``(E, O, I)`` weight gradient in place, segment by segment (plain
    autograd over ``W[e]`` would build one full-size zero tensor per expert and add them up).
    """

    @staticmethod
    def forward(ctx, x_NI: Tensor, w_EOI: Tensor, counts: list[int]) -> Tensor:
        ctx.save_for_backward(x_NI, w_EOI)
        ctx.counts = counts
        out = x_NI.new_empty(x_NI.shape[0], w_EOI.shape[1])
        for w_OI, x_s, o_s, c in zip(w_EOI.unbind(0), x_NI.split(counts), out.split(counts), counts):
            if c:
                torch.mm(x_s, w_OI.t(), out=o_s)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_NO: Tensor):
        x_NI, w_EOI = ctx.saved_tensors
        counts = ctx.counts
        grad_NO = grad_NO.contiguous()
        grad_x = x_NI.new_empty(x_NI.shape) if ctx.needs_input_grad[0] else None
        grad_w = empty_grad(w_EOI) if ctx.needs_input_grad[1] else None
        g_segs, x_segs = grad_NO.split(counts), x_NI.split(counts)
        gx_segs = grad_x.split(counts) if grad_x is not None else [None] * len(counts)
        for e, c in enumerate(counts):
            if c == 0:
                if grad_w is not None:
                    grad_w[e].zero_()
                continue
            if grad_x is not None:
                torch.mm(g_segs[e], w_EOI[e], out=gx_segs[e])
            if grad_w is not None:
                torch.mm(g_segs[e].t(), x_segs[e], out=grad_w[e])
        return grad_x, grad_w, None


def _grouped_linear_loop(x_ND: Tensor, w_EOI: Tensor, counts: list[int]) -> Tensor:
    return _GroupedLinearLoop.apply(x_ND, w_EOI, counts)


def grouped_linear(
    x_ND: Tensor,
    w_EOI: Tensor,
    counts_E: Tensor,
    kernel: str,
    offs_E: Tensor | None = None,
    counts: list[int] | None = None,
) -> Tensor:
    """Apply expert ``e``'s matrix to its contiguous row segment: ``(N, I) -> (N, O)``.

    Args:
        x_ND: rows sorted by expert.
        w_EOI: ``(E, O, I)`` stacked weights (``nn.Linear`` layout per expert).
        counts_E: ``(E,)`` rows per expert.
        kernel: ``"grouped_mm"`` or ``"loop"``.
        offs_E: precomputed :func:`segment_offsets` (grouped_mm).
        counts: precomputed ``counts_E.tolist()`` (loop).
    """
    if kernel == "grouped_mm":
        return _GroupedLinearMM.apply(x_ND, w_EOI, segment_offsets(counts_E) if offs_E is None else offs_E)
    return _grouped_linear_loop(x_ND, w_EOI, counts_E.tolist() if counts is None else counts)
