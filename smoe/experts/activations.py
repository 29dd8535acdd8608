"""The hidden nonlinearities of expert MLPs and dense MLPs, by name; each is defined once, here.

An MLP of either kind computes ``w2 act(w1 x + b1, w3 x + b3) + b2``. A *gated* activation (GLU family) reads both
projections, a plain one only the first:

===========  ======  ===================================================================================
name         gated   ``act(h1, h3)``
===========  ======  ===================================================================================
``swiglu``   yes     ``silu(h1) * h3`` (Shazeer 2020, "GLU Variants Improve Transformer"; Llama, Mixtral)
``gelu``     no      ``gelu(h1)``, exact erf form (ViT / V-MoE MlpBlock, BERT)
``relu``     no      ``relu(h1)`` (the original Transformer FFN; Switch Transformers' experts)
``clamped_`` yes     ``(clamp(h3, -7, 7) + 1) * g * sigmoid(1.702 g)``, ``g = min(h1, 7)`` (GPT-OSS;
``swiglu``           :func:`clamped_swiglu`, whose ``limit`` / ``alpha`` the experts of that name can change)
===========  ======  ===================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Activation", "ACTIVATIONS", "get_activation", "clamped_swiglu"]


def clamped_swiglu(h1: Tensor, h3: Tensor, *, limit: float = 7.0, alpha: float = 1.702) -> Tensor:
    """GPT-OSS's clamped GLU ``(clamp(h3, -limit, limit) + 1) * g * sigmoid(alpha g)`` with ``g = min(h1, limit)``
    (Hugging Face ``GptOssExperts._apply_gate``; ``limit = swiglu_limit = 7``, ``alpha = 1.702`` in the released
    models)."""
    gate = h1.clamp(max=limit)
    return (h3.clamp(-limit, limit) + 1.0) * gate * torch.sigmoid(alpha * gate)


@dataclass(frozen=True)
class Activation:
    """A named hidden nonlinearity.

    Attributes:
        name: registry name.
        gated: whether it reads a second (up) projection ``h3``.
        fn: ``fn(h1, h3)``; ``h3`` is ``None`` for plain activations.
    """

    name: str
    gated: bool
    fn: Callable[[Tensor, Tensor | None], Tensor]

    def __call__(self, h1: Tensor, h3: Tensor | None) -> Tensor:
        return self.fn(h1, h3)


ACTIVATIONS: dict[str, Activation] = {
    "swiglu": Activation("swiglu", True, lambda h1, h3: F.silu(h1) * h3),
    "gelu": Activation("gelu", False, lambda h1, h3: F.gelu(h1)),
    "relu": Activation("relu", False, lambda h1, h3: F.relu(h1)),
    "clamped_swiglu": Activation("clamped_swiglu", True, lambda h1, h3: clamped_swiglu(h1, h3)),
}


def get_activation(name: str) -> Activation:
    """The activation ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None
