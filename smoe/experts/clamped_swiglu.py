"""GPT-OSS's clamped SwiGLU experts (OpenAI, "gpt-oss-120b & gpt-oss-20b Model Card", 2025; Hugging Face
``GptOssExperts``).

Each expert computes, with ``h1 = w1 x + b1`` (gate) and ``h3 = w3 x + b3`` (up)::

    f(x) = w2 [ (clamp(h3, -limit, limit) + 1) * g * sigmoid(alpha * g) ] + b2,   g = min(h1, limit)

``limit = 7`` (the config's ``swiglu_limit``) and ``alpha = 1.702`` (``swiglu_alpha``) in the released models:
``g * sigmoid(1.702 g)`` is the sigmoid approximation of GELU, the clamps bound the activations, and the ``+ 1``
on the up projection lets the gate pass through where ``h3 = 0``. The released checkpoints have biases on every
projection (``bias=True``). Hugging Face stores ``gate_up_proj`` as ``(E, D, 2F)`` with the gate and up columns
*interleaved* (gate at even, up at odd indices); here they are the usual ``w1_EFD`` / ``w3_EFD``
(:mod:`smoe.interop.hf_families` converts).

The formula is :func:`smoe.experts.activations.clamped_swiglu` (also the ``"clamped_swiglu"`` activation of a dense
:class:`~smoe.experts.MLP`, with the released ``limit`` and ``alpha``). Shape legend as in :mod:`smoe.experts.mlp`.
"""

from __future__ import annotations

import math

from smoe.experts.activations import Activation, clamped_swiglu
from smoe.experts.mlp import MLPExperts
from smoe.experts.registry import register_experts

__all__ = ["ClampedSwiGLUExperts", "clamped_swiglu"]


@register_experts("clamped_swiglu")
class ClampedSwiGLUExperts(MLPExperts):
    """GPT-OSS experts (module docstring).

    Args (beyond :class:`~smoe.experts.mlp.MLPExperts`):
        limit: the clamp ``swiglu_limit`` (> 0; 7.0).
        alpha: the sigmoid's slope ``swiglu_alpha`` (1.702).
    """

    activation = "clamped_swiglu"

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        *,
        bias: bool = False,
        limit: float = 7.0,
        alpha: float = 1.702,
        device=None,
        dtype=None,
    ) -> None:
        for name, value in (("limit", limit), ("alpha", alpha)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        self.limit, self.alpha = float(limit), float(alpha)
        super().__init__(dim, hidden_dim, num_experts, bias=bias, device=device, dtype=dtype)

    @property
    def act(self) -> Activation:
        limit, alpha = self.limit, self.alpha
        return Activation("clamped_swiglu", True, lambda h1, h3: clamped_swiglu(h1, h3, limit=limit, alpha=alpha))

    def init_kwargs(self) -> dict:
        return {"limit": self.limit, "alpha": self.alpha}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, limit={self.limit}, alpha={self.alpha}"
