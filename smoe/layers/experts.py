"""Expert MLPs stored as stacked tensors, one tensor per projection with a leading expert axis.

Parameter layout (this *is* the checkpoint format; each slice ``w[e]`` is laid out like ``nn.Linear.weight``,
``(out_features, in_features)``, so the weights of a Hugging Face Mixtral block or a dense MLP copy in directly):

==========  ===============  ============================================================
name        shape            meaning
==========  ===============  ============================================================
``w1_EFD``  ``(E, F, D)``    SwiGLU gate projection / GELU first projection
``w3_EFD``  ``(E, F, D)``    SwiGLU up projection (SwiGLU only)
``w2_EDF``  ``(E, D, F)``    down projection
``b1_EF``   ``(E, F)``       first-projection bias (GELU experts with ``bias=True`` only)
``b2_ED``   ``(E, D)``       down-projection bias (GELU experts with ``bias=True`` only)
==========  ===============  ============================================================

SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): ``f_e(x) = w2[e] (silu(w1[e] x) * w3[e] x)``.
GELU MLP (the ViT / V-MoE expert): ``f_e(x) = w2[e] gelu(w1[e] x + b1[e]) + b2[e]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Experts", "ExpertWeights", "MLP", "EXPERT_ACTIVATIONS"]

EXPERT_ACTIVATIONS = ("swiglu", "gelu")


def _activate(activation: str, h1: Tensor, h3: Tensor | None) -> Tensor:
    return F.silu(h1) * h3 if activation == "swiglu" else F.gelu(h1)


@dataclass(frozen=True)
class ExpertWeights:
    """The expert tensors the engine reads (same names as :class:`Experts`), possibly cast for autocast."""

    activation: str
    w1_EFD: Tensor
    w3_EFD: Tensor | None
    w2_EDF: Tensor
    b1_EF: Tensor | None
    b2_ED: Tensor | None

    @property
    def num_experts(self) -> int:
        return self.w1_EFD.shape[0]

    def activate(self, h1: Tensor, h3: Tensor | None) -> Tensor:
        return _activate(self.activation, h1, h3)

    def expert_forward(self, e: int, x_MD: Tensor) -> Tensor:
        """Expert ``e`` on ``(M, D)`` rows: ``w2 act(w1 x + b1, w3 x) + b2``."""
        h1 = F.linear(x_MD, self.w1_EFD[e], None if self.b1_EF is None else self.b1_EF[e])
        h3 = None if self.w3_EFD is None else F.linear(x_MD, self.w3_EFD[e])
        return F.linear(self.activate(h1, h3), self.w2_EDF[e], None if self.b2_ED is None else self.b2_ED[e])


class Experts(nn.Module):
    """``E`` expert MLPs of width ``dim -> hidden_dim -> dim`` with stacked weights.

    The module holds parameters only; the engine (:mod:`smoe.engine`) decides how to run them (a per-expert loop
    in the reference path, grouped GEMMs in the fast path). :meth:`expert_forward` is the plain definition of one
    expert that the reference engine and the tests use.

    Args:
        dim: ``D``.
        hidden_dim: ``F``.
        num_experts: ``E``.
        activation: ``"swiglu"`` (default) or ``"gelu"``.
        bias: biases on both projections (GELU experts only, as in ViT's MlpBlock).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        activation: str = "swiglu",
        bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if activation not in EXPERT_ACTIVATIONS:
            raise ValueError(f"activation must be one of {EXPERT_ACTIVATIONS}, got {activation!r}")
        if bias and activation == "swiglu":
            raise ValueError("bias=True is supported for activation='gelu' experts only")
        dd = {"device": device, "dtype": dtype}
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.activation = activation
        self.w1_EFD = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **dd))
        self.w3_EFD = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **dd)) if activation == "swiglu" else None
        self.w2_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **dd))
        self.b1_EF = nn.Parameter(torch.zeros(num_experts, hidden_dim, **dd)) if bias else None
        self.b2_ED = nn.Parameter(torch.zeros(num_experts, dim, **dd)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default (kaiming-uniform, a=sqrt(5)) per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        for w in (self.w1_EFD, self.w3_EFD, self.w2_EDF):
            if w is not None:
                bound = 1.0 / math.sqrt(w.shape[-1])
                nn.init.uniform_(w, -bound, bound)
        for b in (self.b1_EF, self.b2_ED):
            if b is not None:
                nn.init.zeros_(b)

    def activate(self, h1: Tensor, h3: Tensor | None) -> Tensor:
        """The hidden nonlinearity: ``silu(h1) * h3`` (SwiGLU) or ``gelu(h1)``."""
        return _activate(self.activation, h1, h3)

    def expert_forward(self, e: int, x_MD: Tensor) -> Tensor:
        """Reference definition of expert ``e`` on ``(M, D)`` rows -> ``(M, D)``."""
        return self.cast(None).expert_forward(e, x_MD)

    def cast(self, dtype: torch.dtype | None) -> ExpertWeights:
        """The weights as plain tensors, cast to ``dtype`` (differentiably), for the engine under autocast."""

        def c(w):
            return None if w is None or dtype is None else w.to(dtype)

        if dtype is None:
            return ExpertWeights(self.activation, self.w1_EFD, self.w3_EFD, self.w2_EDF, self.b1_EF, self.b2_ED)
        return ExpertWeights(
            self.activation, c(self.w1_EFD), c(self.w3_EFD), c(self.w2_EDF), c(self.b1_EF), c(self.b2_ED)
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, {self.activation}"


class MLP(nn.Module):
    """A dense MLP with the same definition as one expert (the shared expert, and dense FFN blocks).

    Args:
        dim: ``D``.
        hidden_dim: ``F``.
        activation: ``"swiglu"`` or ``"gelu"``.
        bias: biases (GELU only).
    """

    def __init__(
        self, dim: int, hidden_dim: int, activation: str = "swiglu", bias: bool = False, device=None, dtype=None
    ):
        super().__init__()
        if activation not in EXPERT_ACTIVATIONS:
            raise ValueError(f"activation must be one of {EXPERT_ACTIVATIONS}, got {activation!r}")
        dd = {"device": device, "dtype": dtype}
        self.activation = activation
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias, **dd)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False, **dd) if activation == "swiglu" else None
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(_activate(self.activation, self.w1(x), None if self.w3 is None else self.w3(x)))
