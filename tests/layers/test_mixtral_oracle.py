"""An outside oracle: Hugging Face ``transformers``' Mixtral sparse-MoE block.

With copied weights, ``smoe.MoE`` with top-k-then-softmax routing (``order="topk_softmax"``, Mixtral's router) and
SwiGLU experts must reproduce ``MixtralSparseMoeBlock`` on outputs and on the gradients of the input, the router
weight and every expert weight, in float64, on both engine paths. Weight layout in transformers 5.x:
``gate_up_proj (E, 2F, D) = cat(w1, w3)`` along the hidden axis, ``down_proj (E, D, F) = w2``, ``gate.weight (E, D)``;
in 4.x each expert is a module with ``w1``/``w3``/``w2`` linears.

Both sides compute the router softmax in float32 whatever the input dtype (HF: ``softmax(..., dtype=torch.float)``;
smoe: selective precision), Mixtral as softmax-over-all, top-k, renormalise and smoe as top-k then softmax over the
k: equal in exact arithmetic, so the combine weights agree to float32 rounding (~1e-7 relative) and the tolerance
is set to that; the expert math is float64 on both sides.
"""

import re

import pytest
import torch

import smoe

transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers")
from smoe.interop import from_mixtral_block, to_mixtral_block  # noqa: E402

F64 = torch.float64


def _hf_expert_grads(block, E):
    """Gradients of the HF expert weights in smoe's layout ``(w1, w3, w2)``."""
    experts = block.experts
    if hasattr(experts, "gate_up_proj"):
        g = experts.gate_up_proj.grad
        F = g.shape[1] // 2
        return g[:, :F], g[:, F:], experts.down_proj.grad
    stack = lambda name: torch.stack([getattr(experts[e], name).weight.grad for e in range(E)])  # noqa: E731
    return stack("w1"), stack("w3"), stack("w2")


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize(("E", "K"), [(4, 2), (8, 2), (6, 1), (4, 4)])
def test_topk_softmax_swiglu_reproduces_the_mixtral_block(E, K, backend):
    torch.manual_seed(0)
    D, F, B, L = 16, 24, 3, 5
    layer = smoe.MoE(
        D,
        F,
        E,
        K,
        router_kwargs={"order": "topk_softmax", "balance_loss_weight": 0.0},
        backend=backend,
        dtype=F64,
    )
    with torch.no_grad():  # a gate with a spread of logits, so the top-k choice is not decided by rounding
        layer.router.gate.weight.normal_(0.0, 0.5)
    block = to_mixtral_block(layer)
    x = torch.randn(B, L, D, dtype=F64)
    gy = torch.randn(B, L, D, dtype=F64)

    x_smoe = x.clone().requires_grad_(True)
    y_smoe, aux = layer(x_smoe)
    (y_smoe * gy).sum().backward()

    x_hf = x.clone().requires_grad_(True)
    out = block(x_hf)
    y_hf = out[0] if isinstance(out, tuple) else out
    (y_hf * gy).sum().backward()

    tol = dict(atol=1e-6, rtol=1e-5)  # float32 router weights on both sides (module docstring)
    assert float(y_hf.detach().abs().max()) > 1e-2  # a non-trivial output
    torch.testing.assert_close(y_smoe, y_hf, **tol)
    torch.testing.assert_close(x_smoe.grad, x_hf.grad, **tol)
    torch.testing.assert_close(layer.router.gate.weight.grad, block.gate.weight.grad, **tol)
    g1, g3, g2 = _hf_expert_grads(block, E)
    ex = layer.experts
    torch.testing.assert_close(ex.w1_EFD.grad, g1, **tol)
    torch.testing.assert_close(ex.w3_EFD.grad, g3, **tol)
    torch.testing.assert_close(ex.w2_EDF.grad, g2, **tol)


def test_from_mixtral_block_round_trips_and_reproduces_it():
    torch.manual_seed(1)
    layer = smoe.MoE(16, 24, 4, 2, router_kwargs={"order": "topk_softmax"}, dtype=F64)
    block = to_mixtral_block(layer)
    back = from_mixtral_block(block, backend="fast")
    for name, value in layer.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    x = torch.randn(2, 5, 16, dtype=F64)
    with torch.no_grad():
        out = block(x)
        y_hf = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(back(x)[0], y_hf, atol=1e-6, rtol=1e-5)


def test_to_mixtral_block_refuses_what_mixtral_cannot_hold():
    with pytest.raises(ValueError, match="SwiGLU"):
        to_mixtral_block(smoe.MoE(8, 16, 4, 2, expert="gelu"))
    with pytest.raises(ValueError, match="no linear gate"):
        to_mixtral_block(smoe.MoE(8, 16, 4, 2, router="hash"))


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({}, "order='softmax_topk' without renormalize"),  # the default token choice: softmax, then top-k
        ({"router_kwargs": {"score_fn": "sigmoid", "order": "topk_softmax"}}, "score_fn='sigmoid'"),
        ({"capacity_factor": 1.25, "router_kwargs": {"order": "topk_softmax"}}, "capacity_factor=1.25"),
        ({"router": "expert_choice", "capacity_factor": 1.0}, "routes by top-k token choice"),
        ({"router_kwargs": {"order": "topk_softmax", "noise": "gaussian"}}, "noise='gaussian'"),
        ({"router_kwargs": {"order": "topk_softmax", "expert_bias": True}}, "expert_bias=True"),
    ],
)
def test_to_mixtral_block_refuses_routing_mixtral_does_not_compute(kwargs, option):
    with pytest.raises(ValueError, match=re.escape(option)):
        to_mixtral_block(smoe.MoE(8, 16, 4, 2, **kwargs))


def test_softmax_topk_with_renormalisation_is_mixtral_s_routing_and_exports():
    torch.manual_seed(0)
    layer = smoe.MoE(8, 16, 4, 2, router_kwargs={"renormalize": True}, dtype=F64)
    block = to_mixtral_block(layer)
    x = torch.randn(2, 3, 8, dtype=F64)
    with torch.no_grad():
        out = block(x)
        y_hf = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(layer(x)[0], y_hf, atol=1e-6, rtol=1e-5)
