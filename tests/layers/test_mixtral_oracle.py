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

import pytest
import torch

import smoe

transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers")
from transformers import MixtralConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402

F64 = torch.float64


def _hf_block(layer: smoe.MoE) -> MixtralSparseMoeBlock:
    ex = layer.experts
    cfg = MixtralConfig(
        hidden_size=ex.dim,
        intermediate_size=ex.hidden_dim,
        num_local_experts=ex.num_experts,
        num_experts_per_tok=layer.top_k,
        hidden_act="silu",
        router_jitter_noise=0.0,
    )
    block = MixtralSparseMoeBlock(cfg).to(F64)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
        experts = block.experts
        if hasattr(experts, "gate_up_proj"):  # transformers 5.x: stacked expert tensors
            experts.gate_up_proj.copy_(torch.cat([ex.w1_EFD, ex.w3_EFD], dim=1))
            experts.down_proj.copy_(ex.w2_EDF)
        else:  # transformers 4.x: one module per expert
            for e, expert in enumerate(experts):
                expert.w1.weight.copy_(ex.w1_EFD[e])
                expert.w3.weight.copy_(ex.w3_EFD[e])
                expert.w2.weight.copy_(ex.w2_EDF[e])
    return block


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
    block = _hf_block(layer)
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
