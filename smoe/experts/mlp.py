"""Expert MLPs stored as stacked tensors, one tensor per projection with a leading expert axis.

Every expert computes ``f_e(x) = w2[e] act(w1[e] x + b1[e], w3[e] x + b3[e]) + b2[e]`` with the activation of its
type (:mod:`smoe.experts.activations`); registered types:

=============  ==========================================================================================
name           expert
=============  ==========================================================================================
``swiglu``     ``w2 (silu(w1 x) * w3 x)`` (Shazeer 2020; Mixtral, DeepSeek, Qwen-MoE); the default, with a
               fused gather -> experts -> combine path when it has no biases (:mod:`smoe.experts.fused_swiglu`)
``gelu``       ``w2 gelu(w1 x + b1) + b2`` (the ViT / V-MoE expert, Riquelme et al. 2021)
``relu``       ``w2 relu(w1 x + b1) + b2`` (Switch Transformers' experts, Fedus et al. 2021)
=============  ==========================================================================================

Each takes ``bias=True`` for biases on every projection (``b3`` exists for the gated types only).

Parameter layout (this *is* the checkpoint format; each slice ``w[e]`` is laid out like ``nn.Linear.weight``,
``(out_features, in_features)``, so the weights of a Hugging Face Mixtral block or a dense MLP copy in directly):

==========  ===============  ============================================================
name        shape            meaning
==========  ===============  ============================================================
``w1_EFD``  ``(E, F, D)``    gate projection (gated types) / first projection
``w3_EFD``  ``(E, F, D)``    up projection (gated types only)
``w2_EDF``  ``(E, D, F)``    down projection
``b1_EF``   ``(E, F)``       first-projection bias (``bias=True``)
``b3_EF``   ``(E, F)``       up-projection bias (gated types with ``bias=True``)
``b2_ED``   ``(E, D)``       down-projection bias (``bias=True``)
==========  ===============  ============================================================

Shape legend: ``N`` rows grouped by expert, ``M`` rows of one expert, ``E`` experts, ``D`` width, ``F`` hidden.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe.experts.activations import Activation, get_activation
from smoe.experts.base import Experts
from smoe.experts.fused_swiglu import swiglu_experts
from smoe.experts.grouped import grouped_linear, segment_offsets
from smoe.experts.kernels import choose_kernel
from smoe.experts.registry import register_experts
from smoe.routing.plan import SparsePlan

__all__ = ["MLPExperts", "SwiGLUExperts", "GELUExperts", "ReLUExperts", "ExpertWeights"]


class ExpertWeights(NamedTuple):
    """The tensors one forward call computes with: the parameters, or their casts under autocast."""

    w1_EFD: Tensor
    w3_EFD: Tensor | None
    w2_EDF: Tensor
    b1_EF: Tensor | None
    b3_EF: Tensor | None
    b2_ED: Tensor | None


class MLPExperts(Experts):
    """``E`` expert MLPs of width ``dim -> hidden_dim -> dim`` with stacked weights (module docstring).

    Subclasses set ``activation`` (a name of :mod:`smoe.experts.activations`); whether the type is gated follows
    from it.

    Args:
        dim: ``D``.
        hidden_dim: ``F``.
        num_experts: ``E``.
        bias: biases on every projection.
        device, dtype: of the parameters.
    """

    activation: ClassVar[str]

    def __init__(
        self, dim: int, hidden_dim: int, num_experts: int, *, bias: bool = False, device=None, dtype=None
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be True or False, got {bias!r}")
        dd = {"device": device, "dtype": dtype}
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.bias = bias
        gated = self.act.gated
        self.w1_EFD = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **dd))
        self.w3_EFD = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **dd)) if gated else None
        self.w2_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **dd))
        self.b1_EF = nn.Parameter(torch.zeros(num_experts, hidden_dim, **dd)) if bias else None
        self.b3_EF = nn.Parameter(torch.zeros(num_experts, hidden_dim, **dd)) if bias and gated else None
        self.b2_ED = nn.Parameter(torch.zeros(num_experts, dim, **dd)) if bias else None
        self.reset_parameters()

    @property
    def act(self) -> Activation:
        """The hidden nonlinearity of this type."""
        return get_activation(self.activation)

    def reset_parameters(self) -> None:
        # nn.Linear's default (kaiming-uniform, a=sqrt(5)) per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        for w in (self.w1_EFD, self.w3_EFD, self.w2_EDF):
            if w is not None:
                bound = 1.0 / math.sqrt(w.shape[-1])
                nn.init.uniform_(w, -bound, bound)
        for b in (self.b1_EF, self.b3_EF, self.b2_ED):
            if b is not None:
                nn.init.zeros_(b)

    def weights(self, x: Tensor) -> ExpertWeights:
        """The weights in ``x``'s dtype under autocast (cast differentiably), else the parameters themselves.

        ``torch._grouped_mm`` and ``mm(out=...)`` are not autocast ops, so the cast is made here, once per call.
        """
        ws = (self.w1_EFD, self.w3_EFD, self.w2_EDF, self.b1_EF, self.b3_EF, self.b2_ED)
        if self.w1_EFD.dtype != x.dtype and torch.is_autocast_enabled(x.device.type):
            ws = tuple(None if w is None else w.to(x.dtype) for w in ws)
        return ExpertWeights(*ws)

    def init_kwargs(self) -> dict:
        """The constructor options of this type beyond the sizes and ``bias`` (none here; a subclass with its own
        options returns them, so that :meth:`shard` rebuilds it faithfully)."""
        return {}

    def shard(self, first: int, count: int) -> MLPExperts:
        """Experts ``[first, first + count)``: the same type with ``num_experts=count`` and copies of their slices."""
        self._check_shard(first, count)
        ref = self.w1_EFD
        out = type(self)(
            self.dim, self.hidden_dim, count, bias=self.bias, device=ref.device, dtype=ref.dtype, **self.init_kwargs()
        )
        with torch.no_grad():
            for name, p in self.named_parameters(recurse=False):
                getattr(out, name).copy_(p[first : first + count])
        out.train(self.training)
        return out

    def expert_forward(self, e: int, x_MD: Tensor) -> Tensor:
        """Reference definition of expert ``e`` on ``(M, D)`` rows -> ``(M, D)``."""
        w = self.weights(x_MD)

        def lin(x, weight, bias):
            return F.linear(x, weight[e], None if bias is None else bias[e])

        h1 = lin(x_MD, w.w1_EFD, w.b1_EF)
        h3 = None if w.w3_EFD is None else lin(x_MD, w.w3_EFD, w.b3_EF)
        return lin(self.act(h1, h3), w.w2_EDF, w.b2_ED)

    def forward(self, x_ND: Tensor, counts_E: Tensor, *, kernel: str = "auto") -> Tensor:
        """All experts on their row segments with grouped GEMMs (:mod:`smoe.experts.grouped`); ``(N, D) -> (N, D)``."""
        w = self.weights(x_ND)
        kernel = choose_kernel(kernel, x_ND, w.w1_EFD, w.w2_EDF)
        offs = segment_offsets(counts_E) if kernel == "grouped_mm" else None
        counts = counts_E.tolist() if kernel == "loop" else None
        expert_idx_N = None
        if w.b1_EF is not None:  # the expert of each row, for the bias rows
            arange_E = torch.arange(self.num_experts, device=x_ND.device)
            expert_idx_N = torch.repeat_interleave(arange_E, counts_E, output_size=x_ND.shape[0])

        def project(h, weight, bias):
            out = grouped_linear(h, weight, counts_E, kernel, offs, counts)
            return out if bias is None else out + bias.index_select(0, expert_idx_N)

        h1 = project(x_ND, w.w1_EFD, w.b1_EF)
        h3 = None if w.w3_EFD is None else project(x_ND, w.w3_EFD, w.b3_EF)
        return project(self.act(h1, h3), w.w2_EDF, w.b2_ED)

    def flops_per_row(self) -> float:
        projections = (self.w1_EFD, self.w3_EFD, self.w2_EDF)
        return 2.0 * sum(p[0].numel() for p in projections if p is not None)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, {self.activation}"
            f"{', bias' if self.bias else ''}"
        )


@register_experts("swiglu")
class SwiGLUExperts(MLPExperts):
    """SwiGLU experts ``w2 (silu(w1 x + b1) * (w3 x + b3)) + b2`` (Shazeer 2020; Mixtral, DeepSeek, Qwen-MoE).

    Without biases they offer the fused gather -> experts -> combine op of :mod:`smoe.experts.fused_swiglu`, and
    their seam path runs the same op without the gather and the combine.
    """

    activation = "swiglu"

    @property
    def can_fuse(self) -> bool:
        return not self.bias

    def forward(self, x_ND: Tensor, counts_E: Tensor, *, kernel: str = "auto") -> Tensor:
        if self.bias:
            return super().forward(x_ND, counts_E, kernel=kernel)
        w = self.weights(x_ND)
        return swiglu_experts(x_ND, w.w1_EFD, w.w3_EFD, w.w2_EDF, counts_E, kernel)

    def fused_sparse(self, x_RD: Tensor, plan: SparsePlan, *, kernel: str = "auto") -> Tensor:
        """Gather, SwiGLU experts and weighted combine of a sparse plan as one op; ``(R, D) -> (T, D)``."""
        if self.bias:
            raise NotImplementedError("SwiGLU experts with biases have no fused path")
        w = self.weights(x_RD)
        return swiglu_experts(
            x_RD,
            w.w1_EFD,
            w.w3_EFD,
            w.w2_EDF,
            plan.counts_E,
            kernel,
            source_idx_N=plan.gather_idx_N,
            token_idx_N=plan.token_idx_N,
            weight_N=plan.weight_N.to(x_RD.dtype),
            num_tokens=plan.num_tokens,
        )


@register_experts("gelu")
class GELUExperts(MLPExperts):
    """GELU MLP experts ``w2 gelu(w1 x + b1) + b2`` (ViT's MlpBlock, the V-MoE expert)."""

    activation = "gelu"


@register_experts("relu")
class ReLUExperts(MLPExperts):
    """ReLU MLP experts ``w2 relu(w1 x + b1) + b2`` (the Transformer FFN; Switch Transformers' experts)."""

    activation = "relu"
