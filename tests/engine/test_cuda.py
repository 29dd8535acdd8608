"""The engine on a CUDA device against the float64 reference on CPU (skipped without CUDA: the ``gpu`` marker).

On a GPU the fast path runs ``torch._grouped_mm`` for float32 / bfloat16 (``choose_kernel``: one call for all
experts, no host sync in the fused op), and the per-expert loop for float64. These tests are the oracle for that
path on the hardware it is written for: every case of ``test_equivalence.CASES`` is run on the device and compared,
on the output and on the gradients of the input and every parameter, with the same layer in float64 on CPU under the
reference engine. CPU-only machines (CI here) skip them; ``python -m pytest -q -m gpu`` runs them where a GPU is.
"""

import copy

import pytest
import torch
from test_equivalence import CASES, F64, _grads, make_layer

import smoe
from smoe.experts.kernels import choose_kernel

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _check_on_device(case, dtype, atol, rtol, backend="auto"):
    kw, shape = CASES[case]
    ref = make_layer(dtype=F64, **kw)
    with torch.no_grad():  # a decisive router: float32 rounding must not flip a top-k choice
        ref.router.gate.weight.mul_(20)
    dev_layer = copy.deepcopy(ref).to(CUDA, dtype)
    x = torch.randn(shape, dtype=F64)
    gy = torch.randn(shape, dtype=F64)
    y_want, g_want, _ = _grads(ref, x, "reference", gy)
    y_got, g_got, _ = _grads(dev_layer, x.to(CUDA, dtype), backend, gy.to(CUDA, dtype))
    want, got = [y_want, *g_want], [y_got, *g_got]
    names = ["output", "input"] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a.double().cpu(), b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["auto", "unfused"])  # the fused op where offered; the dispatcher seam
@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_engine_float32_on_cuda_matches_float64_reference(case, backend):
    _check_on_device(case, torch.float32, atol=2e-5, rtol=2e-4, backend=backend)


@pytest.mark.parametrize("case", ["dropless_k2", "capacity_drops", "expert_choice", "top_k_equals_num_experts"])
def test_fast_engine_float64_on_cuda_matches_float64_reference(case):
    _check_on_device(case, F64, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("case", ["dropless_k2", "expert_choice", "one_token"])
def test_fast_engine_bfloat16_on_cuda_is_close_to_float64_reference(case):
    _check_on_device(case, torch.bfloat16, atol=5e-2, rtol=5e-2)


def test_reference_engine_on_cuda_matches_cpu():
    _check_on_device("dropless_k2", torch.float32, atol=2e-5, rtol=2e-4, backend="reference")


def test_grouped_mm_is_the_cuda_kernel_for_float32_and_bfloat16():
    x = torch.randn(8, 16, device=CUDA)
    w = torch.randn(4, 32, 16, device=CUDA)
    assert choose_kernel("auto", x, w) == "grouped_mm"
    assert choose_kernel("auto", x.bfloat16(), w.bfloat16()) == "grouped_mm"
    assert choose_kernel("auto", x.double(), w.double()) == "loop"


def test_training_step_on_cuda_moves_every_parameter():
    layer = smoe.MoE(64, 128, 8, top_k=2).to(CUDA)
    before = [p.detach().clone() for p in layer.parameters()]
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    y, aux = layer(torch.randn(2, 16, 64, device=CUDA))
    (y.square().mean() + aux.loss).backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, layer.parameters()))
