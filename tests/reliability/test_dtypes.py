"""Issue 14, item 4: a float16/bfloat16/float64 input to a float32 MoE fails at the layer's boundary as
``nn.Linear`` does (a RuntimeError, here also a ValueError naming both dtypes); autocast accepts what it accepts."""

from __future__ import annotations

import pytest
import torch

import smoe
from smoe.layers.moe import DTypeMismatchError


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("experts", ["swiglu", "gelu"])
def test_a_mismatched_dtype_fails_at_the_boundary_like_nn_linear(dtype, experts):
    layer = smoe.MoE(8, 16, 4, 2, experts=experts)
    x = torch.randn(5, 8, dtype=dtype)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.nn.Linear(8, 8)(x)
    with pytest.raises(RuntimeError, match=rf"dtype {dtype} does not match the layer's parameters \(torch.float32\)"):
        layer(x)
    with pytest.raises(ValueError):
        layer(x)
    assert issubclass(DTypeMismatchError, ValueError) and issubclass(DTypeMismatchError, RuntimeError)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["fast", "unfused", "reference"])
def test_autocast_accepts_what_nn_linear_accepts(dtype, backend):
    layer = smoe.MoE(8, 16, 4, 2, backend=backend)
    x = torch.randn(5, 8, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.Linear(8, 8)(x)
        y, aux = layer(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    (y.float().sum() + aux.loss).backward()
    assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def test_an_integer_input_is_refused():
    with pytest.raises(ValueError, match="floating-point"):
        smoe.MoE(8, 16, 4, 2)(torch.ones(5, 8, dtype=torch.long))
