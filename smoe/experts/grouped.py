"""Grouped linear layers over rows grouped by expert, for the stacked MLP experts (:mod:`smoe.experts.mlp`).

:func:`grouped_linear` computes ``h[rows of e] = x[rows of e] @ W[e]^T`` for the contiguous row segment of every
expert, as one autograd op on one of two kernels (:mod:`smoe.experts.kernels`):

* ``"grouped_mm"``: ``torch._grouped_mm`` forward and backward (one call for all experts);
* ``"loop"``: one ``mm`` per non-empty expert writing into one output, and in the backward into one
  ``(E, O, I)`` weight-gradient tensor from :mod:`smoe.experts.buffers`.

Shape legend: ``N`` rows grouped by expert, ``E`` experts, ``I`` / ``O`` input / output width of the projection.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.experts.buffers import empty_grad

__all__ = ["grouped_linear", "segment_offsets"]


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
