"""Fused SwiGLU experts: gather -> ``w1``/``w3`` -> SwiGLU -> ``w2`` -> weighted combine as one autograd op.

``y[tok[n]] += weight[n] * w2[e] (silu(w1[e] x[src[n]]) * w3[e] x[src[n]])`` for the rows ``n`` of each expert
``e`` (rows sorted by expert), with the backward written by hand. It computes exactly what the modular path
computes (the seam: the dispatcher's gather, three grouped GEMMs of :mod:`smoe.experts.grouped`, the activation,
the dispatcher's weighted scatter); it exists because on CPU the modular path spent a large share of its time
outside the GEMMs. Measured at d=512, F=1024, 4096 tokens, top-2, 64 experts, fp32, 2 cores
(``benchmarks/README.md``), the modular path page-faulted about 640 MiB of fresh memory per training step (the
dense MLP it is compared with: about 200 MiB); this op faults none in steady state:

* **no full-size temporaries.** Every elementwise op of the unfused path allocates an ``(N, F)`` tensor (32 MiB
  here: ``silu(h1)``, ``silu * h3``, and four more in the backward); blocks that large come straight from ``mmap``
  and are faulted and zeroed page by page. Here only ``h1`` and ``h3`` are full-size (saved for the backward, from
  the reused buffers of :mod:`smoe.experts.buffers`, like the weight gradients); everything else lives in
  per-expert work buffers of ``max_count`` rows that stay in cache and are reused from one expert to the next.
* **fewer passes over memory.** The activation, the combine weight and the router-weight gradient are applied to
  one expert's rows right after its GEMM, while they are in cache.
* **nothing saved beyond ``h1``, ``h3``.** ``silu(h1) * h3`` is recomputed per expert in the backward (one cheap
  elementwise op), the input rows are gathered again, and the unweighted expert output is never kept: the
  router-weight gradient uses ``<grad_y[tok], act W2^T> = <grad_y[tok] W2, act>``.
* **weight gradients written in place** into one ``(E, O, I)`` tensor per projection (``torch.mm(out=...)``);
  ``torch._grouped_mm``'s CPU weight-gradient kernel (slow for many small groups) is not used on CPU.

The backward is not differentiable again (``once_differentiable``); double backward needs the reference backend.

Two kernels run the same math. ``"loop"``: one ``torch.mm`` per non-empty expert over its contiguous rows, with the
elementwise work fused per expert (the CPU default; one host sync for the counts). ``"grouped_mm"``: the whole row
set at once with ``torch._grouped_mm`` (no host sync; meant for GPUs, where one launch per expert is the cost).

Shape legend: ``R`` engine input rows, ``T`` output tokens, ``N`` assignment rows (sorted by expert), ``E`` experts,
``D`` width, ``F`` expert hidden width, ``M`` rows of one expert (a segment).
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.experts.buffers import empty_grad, empty_saved
from smoe.experts.kernels import choose_kernel

__all__ = ["swiglu_experts"]

_silu = torch._C._nn.silu  # accepts out=
_silu_backward_ = torch.ops.aten.silu_backward.grad_input  # grad * silu'(h), written into grad_input=


class _Segments:
    """The row segments of one call: per-expert counts for the loop kernel, or the grouped_mm offsets."""

    def __init__(self, counts_E: Tensor, kernel: str) -> None:
        self.kernel = kernel
        if kernel == "loop":
            self.counts = counts_E.tolist()  # the one host sync of the loop kernel
            self.experts = [e for e, c in enumerate(self.counts) if c]  # experts with rows, in row order
            self.empty = [e for e, c in enumerate(self.counts) if c == 0]
            self.num_rows = sum(self.counts)
            self.max_rows = max(self.counts, default=0)
        else:
            self.offs_E = torch.cumsum(counts_E, 0).to(torch.int32)

    def split(self, t: Tensor | None) -> list:
        """Per-expert row views of ``t`` (one C++ call instead of one slice per expert)."""
        return [None] * len(self.counts) if t is None else t.split(self.counts)


def _forward_grouped(x_RD, weight_N, w1_EFD, w3_EFD, w2_EDF, src_N, tok_N, num_out, segs, save):
    x_ND = x_RD if src_N is None else x_RD.index_select(0, src_N)
    offs = segs.offs_E
    h1_NF = torch._grouped_mm(x_ND, w1_EFD.transpose(-2, -1), offs=offs)
    h3_NF = torch._grouped_mm(x_ND, w3_EFD.transpose(-2, -1), offs=offs)
    act_NF = _silu(h1_NF).mul_(h3_NF)
    out_ND = torch._grouped_mm(act_NF, w2_EDF.transpose(-2, -1), offs=offs)
    if weight_N is not None:
        out_ND.mul_(weight_N.unsqueeze(1))
    if tok_N is None:
        return out_ND, (h1_NF, h3_NF) if save else (None, None)
    y_TD = out_ND.new_zeros(num_out, out_ND.shape[1]).index_add_(0, tok_N, out_ND)
    return y_TD, (h1_NF, h3_NF) if save else (None, None)


def _forward_loop(x_RD, weight_N, w1_EFD, w3_EFD, w2_EDF, src_N, tok_N, num_out, segs, save):
    N, M, D, F = segs.num_rows, segs.max_rows, x_RD.shape[1], w1_EFD.shape[1]
    # h1, h3 are kept for the backward; without autograd they are per-expert work buffers too
    h1_NF = empty_saved((N, F), w1_EFD) if save else x_RD.new_empty(M, F)
    h3_NF = empty_saved((N, F), w1_EFD) if save else x_RD.new_empty(M, F)
    act_MF = x_RD.new_empty(M, F)
    x_MD = x_RD.new_empty(M, D) if src_N is not None else None
    y = x_RD.new_empty(N, D) if tok_N is None else x_RD.new_zeros(num_out, D)
    out_MD = x_RD.new_empty(M, D) if tok_N is not None else None
    w1t, w3t, w2t = (w.transpose(1, 2).unbind(0) for w in (w1_EFD, w3_EFD, w2_EDF))
    src, tok, wgt = segs.split(src_N), segs.split(tok_N), segs.split(None if weight_N is None else weight_N[:, None])
    h1, h3 = (segs.split(h) for h in (h1_NF, h3_NF)) if save else ([h1_NF] * len(src), [h3_NF] * len(src))
    x_rows, y_rows = segs.split(x_RD if src_N is None else None), segs.split(y if tok_N is None else None)
    for e in segs.experts:
        m = segs.counts[e]
        x_s = x_rows[e] if src_N is None else torch.index_select(x_RD, 0, src[e], out=x_MD[:m])
        h1_s = torch.mm(x_s, w1t[e], out=h1[e] if save else h1_NF[:m])
        h3_s = torch.mm(x_s, w3t[e], out=h3[e] if save else h3_NF[:m])
        act_s = _silu(h1_s, out=act_MF[:m]).mul_(h3_s)
        out_s = torch.mm(act_s, w2t[e], out=y_rows[e] if tok_N is None else out_MD[:m])
        if weight_N is not None:
            out_s.mul_(wgt[e])
        if tok_N is not None:
            y.index_add_(0, tok[e], out_s)
    return y, (h1_NF, h3_NF) if save else (None, None)


def _backward_grouped(ctx, grad_y, x_RD, weight_N, w1_EFD, w3_EFD, w2_EDF, src_N, tok_N, h1_NF, h3_NF):
    need_x, need_weight, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:5]
    offs = ctx.segs.offs_E
    g_ND = grad_y.index_select(0, tok_N) if tok_N is not None else grad_y.clone()
    G_NF = torch._grouped_mm(g_ND, w2_EDF, offs=offs)  # d<g, act W2^T>/d act, before the combine weight
    silu_NF = _silu(h1_NF)
    act_NF = silu_NF * h3_NF
    grad_weight = (G_NF * act_NF).sum(1) if need_weight else None
    if weight_N is not None:
        G_NF.mul_(weight_N.unsqueeze(1))
        g_ND.mul_(weight_N.unsqueeze(1))
    grad_w2 = torch._grouped_mm(g_ND.t(), act_NF, offs=offs) if need_w2 else None
    del act_NF, g_ND
    grad_h3 = silu_NF.mul_(G_NF)
    grad_h1 = _silu_backward_(G_NF.mul_(h3_NF), h1_NF, grad_input=G_NF)
    x_ND = x_RD if src_N is None else x_RD.index_select(0, src_N)
    grad_w1 = torch._grouped_mm(grad_h1.t(), x_ND, offs=offs) if need_w1 else None
    grad_w3 = torch._grouped_mm(grad_h3.t(), x_ND, offs=offs) if need_w3 else None
    grad_x = None
    if need_x:
        gx_ND = torch._grouped_mm(grad_h1, w1_EFD, offs=offs).add_(torch._grouped_mm(grad_h3, w3_EFD, offs=offs))
        grad_x = gx_ND if src_N is None else gx_ND.new_zeros(x_RD.shape).index_add_(0, src_N, gx_ND)
    return grad_x, grad_weight, grad_w1, grad_w3, grad_w2


def _backward_loop(ctx, grad_y, x_RD, weight_N, w1_EFD, w3_EFD, w2_EDF, src_N, tok_N, h1_NF, h3_NF):
    need_x, need_weight, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:5]
    segs = ctx.segs
    M, D, F = segs.max_rows, x_RD.shape[1], w1_EFD.shape[1]
    need_hidden = need_x or need_w1 or need_w3
    # full-size results; experts without rows get zero weight gradients
    grad_x = None
    if need_x:
        grad_x = x_RD.new_zeros(x_RD.shape) if src_N is not None else x_RD.new_empty(x_RD.shape)
    grad_weight = weight_N.new_empty(weight_N.shape) if need_weight else None
    grads_w = [empty_grad(w) if need else None for w, need in ((w1_EFD, need_w1), (w3_EFD, need_w3), (w2_EDF, need_w2))]
    for g in grads_w:
        if g is not None and segs.empty:
            g[segs.empty] = 0
    grad_w1, grad_w3, grad_w2 = grads_w
    # per-expert work buffers, reused from one expert to the next (they stay in cache)
    g_MD, G_MF, silu_MF, act_MF = (x_RD.new_empty(M, n) for n in (D, F, F, F))
    x_MD = x_RD.new_empty(M, D) if src_N is not None and (need_w1 or need_w3) else None
    gx_MD = x_RD.new_empty(M, D) if src_N is not None and need_x else None
    w1_, w3_, w2_ = (w.unbind(0) for w in (w1_EFD, w3_EFD, w2_EDF))
    src, tok, h1, h3 = segs.split(src_N), segs.split(tok_N), segs.split(h1_NF), segs.split(h3_NF)
    wgt = segs.split(None if weight_N is None else weight_N[:, None])
    gwgt = segs.split(grad_weight)
    x_rows, gy_rows = segs.split(x_RD if src_N is None else None), segs.split(grad_y if tok_N is None else None)
    gx_rows = segs.split(grad_x if need_x and src_N is None else None)
    for e in segs.experts:
        m = segs.counts[e]
        h1_s, h3_s = h1[e], h3[e]
        if tok_N is not None:
            g_s = torch.index_select(grad_y, 0, tok[e], out=g_MD[:m])
        else:
            g_s = g_MD[:m].copy_(gy_rows[e])
        G_s = torch.mm(g_s, w2_[e], out=G_MF[:m])  # d<g, act W2^T> / d act, before the combine weight
        silu_s = _silu(h1_s, out=silu_MF[:m])
        act_s = torch.mul(silu_s, h3_s, out=act_MF[:m])
        if need_weight:
            # <grad_y[tok], act W2^T> = <grad_y[tok] W2, act>: no unweighted expert output to keep
            torch.sum(G_s.mul(act_s), 1, out=gwgt[e])
        if weight_N is not None:
            G_s.mul_(wgt[e])
            g_s.mul_(wgt[e])
        if need_w2:
            torch.mm(g_s.t(), act_s, out=grad_w2[e])
        if not need_hidden:
            continue
        grad_h3 = silu_s.mul_(G_s)  # d/dh3 = g * silu(h1)
        grad_h1 = _silu_backward_(G_s.mul_(h3_s), h1_s, grad_input=G_s)  # d/dh1 = g * h3 * silu'(h1)
        if need_w1 or need_w3:
            x_s = x_rows[e] if src_N is None else torch.index_select(x_RD, 0, src[e], out=x_MD[:m])
            if need_w1:
                torch.mm(grad_h1.t(), x_s, out=grad_w1[e])
            if need_w3:
                torch.mm(grad_h3.t(), x_s, out=grad_w3[e])
        if need_x:
            gx_s = torch.mm(grad_h1, w1_[e], out=gx_rows[e] if src_N is None else gx_MD[:m])
            gx_s.addmm_(grad_h3, w3_[e])
            if src_N is not None:
                grad_x.index_add_(0, src[e], gx_s)
    return grad_x, grad_weight, grad_w1, grad_w3, grad_w2


class _SwiGLUExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, weight_N, w1_EFD, w3_EFD, w2_EDF, src_N, tok_N, num_out, segs, save):
        run = _forward_loop if segs.kernel == "loop" else _forward_grouped
        y, (h1_NF, h3_NF) = run(x_RD, weight_N, w1_EFD, w3_EFD, w2_EDF, src_N, tok_N, num_out, segs, save)
        if save:
            ctx.segs = segs
            ctx.save_for_backward(x_RD, weight_N, w1_EFD, w3_EFD, w2_EDF, src_N, tok_N, h1_NF, h3_NF)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        run = _backward_loop if ctx.segs.kernel == "loop" else _backward_grouped
        grads = run(ctx, grad_y.contiguous(), *ctx.saved_tensors)
        return (*grads, None, None, None, None, None)


def swiglu_experts(
    x_RD: Tensor,
    w1_EFD: Tensor,
    w3_EFD: Tensor,
    w2_EDF: Tensor,
    counts_E: Tensor,
    kernel: str,
    *,
    source_idx_N: Tensor | None = None,
    token_idx_N: Tensor | None = None,
    weight_N: Tensor | None = None,
    num_tokens: int = 0,
) -> Tensor:
    """SwiGLU experts on rows sorted by expert, with optional fused gather and weighted combine.

    Args:
        x_RD: engine input rows.
        w1_EFD, w3_EFD, w2_EDF: stacked expert weights (``nn.Linear`` layout per expert).
        counts_E: ``(E,)`` rows per expert; expert ``e`` owns the next ``counts_E[e]`` rows.
        kernel: ``"loop"``, ``"grouped_mm"`` or ``"auto"`` (resolved by :func:`smoe.experts.kernels.choose_kernel`).
        source_idx_N: ``(N,)`` input row of each assignment row; ``None``: row ``n`` is ``x_RD[n]``.
        token_idx_N: ``(N,)`` output token of each row; ``None``: return the ``(N, D)`` expert outputs.
        weight_N: ``(N,)`` combine weights (differentiable), or ``None`` for 1.
        num_tokens: ``T``, rows of the combined output (with ``token_idx_N``).

    Returns:
        ``(T, D)`` with ``y[tok[n]] += weight[n] * f_{e(n)}(x[src[n]])``, or ``(N, D)`` without ``token_idx_N``.
    """
    segs = _Segments(counts_E, choose_kernel(kernel, x_RD, w1_EFD, w3_EFD, w2_EDF))
    grad_inputs = (x_RD, weight_N, w1_EFD, w3_EFD, w2_EDF)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs)
    with torch.autocast(x_RD.device.type, enabled=False):  # operands are already in the compute dtype
        return _SwiGLUExperts.apply(
            x_RD, weight_N, w1_EFD, w3_EFD, w2_EDF, source_idx_N, token_idx_N, num_tokens, segs, save
        )
