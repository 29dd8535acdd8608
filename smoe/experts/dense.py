"""A dense MLP with the same definition as one stacked expert: the shared expert, and dense FFN blocks.

``MLP(dim, hidden_dim, activation)`` computes ``w2 act(w1 x + b1, w3 x + b3) + b2`` with the activation of
:mod:`smoe.experts.activations` (``w3`` for gated activations only), exactly what one expert of
:mod:`smoe.experts.mlp` of the same activation computes; its ``nn.Linear`` weights are laid out like one slice of
the stacked tensors.
"""

from __future__ import annotations

from torch import Tensor, nn

from smoe.experts.activations import get_activation

__all__ = ["MLP"]


class MLP(nn.Module):
    """A dense MLP (module docstring).

    Args:
        dim: ``D``.
        hidden_dim: ``F``.
        activation: ``"swiglu"``, ``"gelu"`` or ``"relu"``.
        bias: biases on every projection.
    """

    def __init__(
        self, dim: int, hidden_dim: int, activation: str = "swiglu", bias: bool = False, device=None, dtype=None
    ):
        super().__init__()
        act = get_activation(activation)
        dd = {"device": device, "dtype": dtype}
        self.activation = activation
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias, **dd)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias, **dd) if act.gated else None
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias, **dd)

    def forward(self, x: Tensor) -> Tensor:
        act = get_activation(self.activation)
        return self.w2(act(self.w1(x), None if self.w3 is None else self.w3(x)))
