"""Fast engine == reference engine on outputs and on the gradients of every input and parameter.

float64 on CPU exercises the whole fast path (sorting, fused gather/scatter autograd ops, segment GEMMs with the
``loop`` kernel; ``torch._grouped_mm`` has no float64 kernel). The ``grouped_mm`` kernel is then checked in float32
against the float64 reference with a float32 tolerance.
"""

import pytest
import torch

import smoe
from smoe.experts.kernels import HAS_GROUPED_MM

F64 = torch.float64


def _grads(layer: smoe.MoE, x: torch.Tensor, backend: str, gy: torch.Tensor):
    """Output and gradients of <y, gy> w.r.t. the input and every parameter under ``backend``."""
    x = x.detach().clone().requires_grad_(True)
    with smoe.use_backend(backend):
        y, aux = layer(x)
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad((y * gy).sum(), [x, *params], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [x, *params])]
    return y.detach(), grads, aux


def assert_engines_agree(layer, x, fast_backend="loop", atol=1e-10, rtol=1e-8, ref_layer=None):
    gy = torch.randn(x.shape, dtype=x.dtype)
    y_ref, g_ref, aux_ref = _grads(
        ref_layer or layer,
        x.to(next((ref_layer or layer).parameters()).dtype),
        "reference",
        gy.to(next((ref_layer or layer).parameters()).dtype),
    )
    y_fast, g_fast, aux_fast = _grads(layer, x, fast_backend, gy)
    names = ["input"] + [n for n, _ in layer.named_parameters()]
    torch.testing.assert_close(y_fast, y_ref.to(y_fast.dtype), atol=atol, rtol=rtol, msg="outputs differ")
    for name, a, b in zip(names, g_fast, g_ref):
        torch.testing.assert_close(a, b.to(a.dtype), atol=atol, rtol=rtol, msg=lambda m, n=name: f"grad {n}: {m}")
    return aux_fast


def make_layer(E=4, K=2, D=8, F=16, router="token_choice", cf=None, dtype=F64, **kw):
    return smoe.MoE(D, F, E, K, router=router, capacity_factor=cf, dtype=dtype, **kw)


CASES = {
    # name: (layer kwargs, input shape)
    "dropless_k2": (dict(E=4, K=2), (2, 5, 8)),
    "dropless_k1": (dict(E=4, K=1), (13, 8)),
    "one_token": (dict(E=4, K=2), (1, 8)),
    "more_experts_than_tokens": (dict(E=16, K=2), (3, 8)),
    "top_k_equals_num_experts": (dict(E=4, K=4), (6, 8)),
    "capacity_drops": (dict(E=4, K=2, cf=0.5), (2, 8, 8)),
    "capacity_bpr": (dict(E=4, K=2, cf=0.75, router_kwargs={"batch_priority": True}), (16, 8)),
    "mixtral_order_renorm": (dict(E=6, K=2, router_kwargs={"order": "topk_softmax"}), (9, 8)),
    "sigmoid_renorm": (dict(E=6, K=3, router_kwargs={"score_fn": "sigmoid", "renormalize": True}), (9, 8)),
    "expert_choice": (dict(E=4, K=2, router="expert_choice", cf=1.5), (2, 6, 8)),
    "expert_choice_position": (dict(E=4, K=1, router="expert_choice", group_mode="position"), (3, 4, 8)),
    "force_balanced": (dict(E=4, K=2, router="force_balanced"), (10, 8)),
    "gelu_bias_experts": (dict(E=4, K=2, expert="gelu", expert_bias=True), (7, 8)),
    "shared_expert": (dict(E=4, K=2, shared_expert_hidden_dim=12), (2, 3, 8)),
    "grouped_capacity": (dict(E=4, K=1, cf=1.0, group_size=4), (4, 4, 8)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_equals_reference_float64(case):
    kw, shape = CASES[case]
    layer = make_layer(**kw)
    with torch.no_grad():  # make the router decisive so that ties cannot flip between runs
        layer.router.gate.weight.mul_(20)
    assert_engines_agree(layer, torch.randn(shape, dtype=F64))


def test_experts_without_tokens_and_all_tokens_to_one_expert():
    layer = make_layer(E=5, K=1)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[2] = 1.0  # positive inputs -> expert 2 has the largest logit for every token
    x = torch.rand(11, 8, dtype=F64) + 0.1
    aux = assert_engines_agree(layer, x)
    counts = aux.stats["tokens_per_expert"]
    assert counts.tolist() == [0, 0, 11, 0, 0]


def test_all_tokens_to_one_expert_with_capacity_drops_the_rest():
    layer = make_layer(E=4, K=1, cf=1.0)  # capacity ceil(1.0 * 8 * 1 / 4) = 2
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[1] = 1.0
    x = torch.rand(8, 8, dtype=F64) + 0.1
    aux = assert_engines_agree(layer, x)
    assert aux.stats["tokens_per_expert"].tolist() == [0, 2, 0, 0]
    assert aux.stats["drop_rate"].item() == pytest.approx(6 / 8)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="this torch has no torch._grouped_mm")
@pytest.mark.parametrize(
    "case",
    ["dropless_k2", "capacity_drops", "expert_choice", "gelu_bias_experts", "top_k_equals_num_experts", "one_token"],
)
def test_grouped_mm_kernel_matches_float64_reference(case):
    kw, shape = CASES[case]
    layer32 = make_layer(dtype=torch.float32, **kw)
    with torch.no_grad():
        layer32.router.gate.weight.mul_(20)
    layer64 = make_layer(dtype=F64, **kw)
    layer64.load_state_dict({k: v.double() for k, v in layer32.state_dict().items()})
    x = torch.randn(shape)
    assert_engines_agree(layer32, x, fast_backend="grouped_mm", atol=2e-5, rtol=2e-4, ref_layer=layer64)


def test_dense_plan_fast_equals_reference():
    """The dense (Soft-MoE style) engine path, driven by a hand-made DensePlan."""
    from smoe.engine import LocalDispatcher, run_dense_reference
    from smoe.experts import SwiGLUExperts as Experts
    from smoe.routing.plan import DensePlan

    G, S, E, C, D = 2, 5, 3, 2, 8
    experts = Experts(D, 16, E, dtype=F64)
    x = torch.randn(G * S, D, dtype=F64, requires_grad=True)
    logits = torch.randn(G, S, E, C, dtype=F64, requires_grad=True)

    def plan():  # a fresh graph for each engine
        return DensePlan(dispatch_GSEC=logits.softmax(1), combine_GSEC=logits.flatten(2).softmax(-1).view(G, S, E, C))

    plan().validate()
    gy = torch.randn(G * S, D, dtype=F64)
    inputs = [x, logits, *experts.parameters()]
    y_ref = run_dense_reference(x, plan(), experts)
    g_ref = torch.autograd.grad((y_ref * gy).sum(), inputs)
    y_fast = LocalDispatcher().run(x, plan(), experts, kernel="loop")
    g_fast = torch.autograd.grad((y_fast * gy).sum(), inputs)
    torch.testing.assert_close(y_fast, y_ref)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b)


def test_backend_override_and_validation(monkeypatch):
    assert smoe.get_backend() in smoe.BACKENDS
    with smoe.use_backend("reference"):
        assert smoe.get_backend() == "reference"
    monkeypatch.setenv("SMOE_BACKEND", "loop")
    assert smoe.get_backend() == "loop"
    monkeypatch.setenv("SMOE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        smoe.get_backend()
    with pytest.raises(ValueError, match="nope"):
        make_layer(backend="nope")
