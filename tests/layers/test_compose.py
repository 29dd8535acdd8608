"""The MoE layer composes a router, experts and a dispatcher, given by name or as instances.

* names and instances build the same layer (same parameters, outputs and gradients);
* a non-local dispatcher runs the seam (dispatch -> experts -> combine), never the experts' fused op, and equals
  the reference engine;
* experts may return rows of another shape than they take (an image decoder), on sparse and dense plans;
* the shared expert, optionally gated by ``sigmoid(x W_g)`` (Qwen2-MoE), is added to the routed output;
* bad compositions are refused with a ``ValueError`` naming the part.
"""

import pytest
import torch
from torch import nn

import smoe
from smoe.engine import LocalDispatcher
from smoe.engine.dispatcher import Dispatcher

F64 = torch.float64
D, F, E, K = 8, 16, 4, 2


def _grads(layer, x, gy):
    x = x.detach().clone().requires_grad_(True)
    y, aux = layer(x)
    names, params = zip(*layer.named_parameters())
    grads = torch.autograd.grad((y * gy).sum() + aux.loss, [x, *params], allow_unused=True)
    return y.detach(), {n: g for n, g in zip(["input", *names], grads)}


def _assert_same(a, b):
    y_a, g_a = a
    y_b, g_b = b
    torch.testing.assert_close(y_a, y_b, atol=1e-12, rtol=1e-10)
    assert g_a.keys() == g_b.keys()
    for key in g_a:
        if g_a[key] is None or g_b[key] is None:
            assert g_a[key] is None and g_b[key] is None, key
            continue
        torch.testing.assert_close(g_a[key], g_b[key], atol=1e-12, rtol=1e-10, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize(
    ("router", "experts", "router_kwargs", "bias"),
    [
        ("token_choice", "swiglu", {}, False),
        ("expert_choice", "gelu", {}, True),
        ("soft", "relu", {"num_slots": 2}, False),
        ("token_choice", "swiglu", {"order": "topk_softmax"}, True),
    ],
)
def test_names_and_instances_build_the_same_layer(router, experts, router_kwargs, bias):
    torch.manual_seed(3)
    by_name = smoe.MoE(
        D, F, E, K, router=router, experts=experts, dispatcher="local", expert_bias=bias, router_kwargs=router_kwargs,
        dtype=F64,
    )  # fmt: skip
    torch.manual_seed(3)  # the same draws, in the same order: router first, then experts
    r = smoe.build_router(router, dim=D, num_experts=E, top_k=K, dtype=F64, **router_kwargs)
    ex = smoe.build_experts(experts, dim=D, hidden_dim=F, num_experts=E, bias=bias, dtype=F64)
    by_instance = smoe.MoE(D, F, E, K, router=r, experts=ex, dispatcher=LocalDispatcher())
    assert by_instance.router is r and by_instance.experts is ex
    sd_name, sd_inst = by_name.state_dict(), by_instance.state_dict()
    assert sd_name.keys() == sd_inst.keys()
    for key in sd_name:
        assert torch.equal(sd_name[key], sd_inst[key]), key
    x = torch.randn(2, 5, D, dtype=F64)
    gy = torch.randn(2, 5, D, dtype=F64)
    _assert_same(_grads(by_name, x, gy), _grads(by_instance, x, gy))


class LoopbackDispatcher(Dispatcher):
    """A dispatcher that is not the local one: rows leave through a copy (as through an exchange) and come back.

    It records what the experts received, so that the test can see the seam was used."""

    def __init__(self):
        self.local = LocalDispatcher()
        self.calls = []

    def dispatch(self, x_RD, plan):
        x_ND, counts_E, state = self.local.dispatch(x_RD, plan)
        self.calls.append(counts_E.clone())
        return x_ND.clone(), counts_E.clone(), state

    def combine(self, y_ND, state):
        return self.local.combine(y_ND.clone(), state)


@pytest.mark.parametrize("router", ["token_choice", "expert_choice", "soft", "s2moe"])
def test_a_non_local_dispatcher_runs_the_seam_and_equals_the_reference(router, monkeypatch):
    torch.manual_seed(0)
    ref = smoe.MoE(D, F, E, K, router=router, backend="reference", dtype=F64)
    dispatcher = LoopbackDispatcher()
    seam = smoe.MoE(D, F, E, K, router=router, dispatcher=dispatcher, dtype=F64)
    seam.load_state_dict(ref.state_dict())
    assert seam.experts.can_fuse  # default SwiGLU experts offer the fused op ...

    def no_fusion(*args, **kwargs):
        raise AssertionError("a non-local dispatcher must not take the fused path")

    monkeypatch.setattr(seam.experts, "fused_sparse", no_fusion)  # ... which the seam must not take
    x = torch.randn(2, 5, D, dtype=F64)
    gy = torch.randn_like(x)
    torch.manual_seed(1)
    want = _grads(ref.eval(), x, gy)
    torch.manual_seed(1)
    got = _grads(seam.eval(), x, gy)
    _assert_same(got, want)
    assert len(dispatcher.calls) == 1 and int(dispatcher.calls[0].sum()) > 0


def test_the_local_dispatcher_takes_the_fused_path_only_when_allowed(monkeypatch):
    layer = smoe.MoE(D, F, E, K, dtype=F64)
    calls = []
    fused = layer.experts.fused_sparse

    def spy(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(layer.experts, "fused_sparse", spy)
    x = torch.randn(6, D, dtype=F64)
    y_fused, _ = layer(x)
    assert calls == [1]
    with smoe.use_backend("unfused"):
        y_seam, _ = layer(x)
    assert calls == [1]  # the seam ran instead
    torch.testing.assert_close(y_seam, y_fused)


class ToImage(nn.Module):
    """An expert whose rows come out as ``(2, 3)`` maps: ``(M, D) -> (M, 2, 3)``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 6)

    def forward(self, x):
        return torch.tanh(self.fc(x)).view(-1, 2, 3)


@pytest.mark.parametrize("router", ["token_choice", "soft"])
@pytest.mark.parametrize("backend", ["reference", "unfused"])
def test_experts_may_return_another_shape(router, backend):
    torch.manual_seed(0)
    experts = smoe.ModuleExperts([ToImage() for _ in range(E)], dim=D).to(F64)
    layer = smoe.MoE(D, None, E, K, router=router, experts=experts, backend=backend, dtype=F64)
    x = torch.randn(3, 4, D, dtype=F64)
    y, aux = layer(x)
    assert y.shape == (3, 4, 2, 3)
    if router == "token_choice":  # each token: the weighted sum of its experts' maps
        plan = aux.plan
        want = torch.zeros(12, 2, 3, dtype=F64)
        for n in range(plan.num_rows):
            t, e = int(plan.token_idx_N[n]), int(plan.expert_idx_N[n])
            want[t] += plan.weight_N[n].to(F64) * experts[e](x.reshape(12, D)[t : t + 1])[0]
        torch.testing.assert_close(y.reshape(12, 2, 3), want)


def test_module_experts_with_experts_that_get_no_rows():
    torch.manual_seed(0)
    experts = smoe.ModuleExperts([nn.Linear(D, D) for _ in range(E)], dim=D).to(F64)
    # top-1 then softmax over the one chosen logit: weight exactly 1
    layer = smoe.MoE(
        D, None, E, 1, experts=experts, dtype=F64, backend="unfused", router_kwargs={"order": "topk_softmax"}
    )
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[2] = 1.0  # positive inputs all go to expert 2
    x = torch.rand(5, D, dtype=F64) + 0.1
    y, aux = layer(x)
    assert aux.stats["tokens_per_expert"].tolist() == [0, 0, 5, 0]
    torch.testing.assert_close(y, experts[2](x))
    y.sum().backward()
    assert experts[0].weight.grad is None and experts[2].weight.grad is not None


@pytest.mark.parametrize("gated", [False, True])
def test_shared_expert_is_added_and_optionally_gated(gated):
    torch.manual_seed(0)
    layer = smoe.MoE(D, F, E, K, shared_expert_hidden_dim=12, shared_expert_gate=gated, dtype=F64)
    routed = smoe.MoE(D, F, E, K, dtype=F64)
    routed.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared_expert")})
    x = torch.randn(2, 3, D, dtype=F64)
    shared = layer.shared_expert(x)
    if gated:  # Qwen2-MoE: y = routed(x) + sigmoid(x W_g^T) * shared(x)
        assert layer.shared_expert_gate.weight.shape == (1, D)
        shared = torch.sigmoid(x @ layer.shared_expert_gate.weight.t()) * shared
    else:
        assert layer.shared_expert_gate is None
    torch.testing.assert_close(layer(x)[0], routed(x)[0] + shared)
    # the shared expert has the routed experts' definition: same activation, dense MLP layout
    assert layer.shared_expert.activation == "swiglu" and layer.shared_expert.w3 is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(router=smoe.build_router("token_choice", dim=D, num_experts=3, top_k=1)), "num_experts=3"),
        (dict(experts=smoe.build_experts("gelu", dim=D + 1, hidden_dim=F, num_experts=E)), "width 9"),
        (dict(experts=smoe.build_experts("gelu", dim=D, hidden_dim=F, num_experts=2)), "num_experts=2"),
        (dict(experts="gelu", expert="relu"), "not both"),
        (dict(experts=smoe.build_experts("gelu", dim=D, hidden_dim=F, num_experts=E), expert_bias=True), "instance"),
        (dict(experts=3), "experts must be"),
        (dict(router=smoe.build_router("token_choice", dim=D, num_experts=E, top_k=K), capacity_factor=1), "instance"),
        (dict(dispatcher="carrier_pigeon"), "carrier_pigeon"),
        (dict(dispatcher=object()), "dispatcher must be"),
        (dict(shared_expert_gate=True), "needs a shared expert"),
        (dict(shared_expert_hidden_dim=-1), "shared_expert_hidden_dim"),
        (dict(expert_kwargs={"colour": "blue"}), "colour"),
    ],
)
def test_bad_compositions_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        smoe.MoE(D, F, E, K, **kwargs)


def test_hidden_dim_may_be_omitted_only_with_an_experts_instance():
    smoe.MoE(D, None, E, K, experts=smoe.build_experts("relu", dim=D, hidden_dim=F, num_experts=E))
    with pytest.raises(ValueError, match="hidden_dim"):
        smoe.MoE(D, None, E, K)


def test_shard_experts_keeps_this_process_s_experts_and_refuses_twice():
    class SecondHalf(smoe.Dispatcher):
        def num_local_experts(self, num_experts):
            return num_experts // 2

        def first_local_expert(self, num_experts):
            return num_experts // 2

    torch.manual_seed(0)
    layer = smoe.MoE(8, 16, 4, 2)
    w1 = layer.experts.w1_EFD.detach().clone()
    d = SecondHalf()
    layer.shard_experts(d)
    assert layer.dispatcher is d and layer.experts.num_experts == 2
    assert torch.equal(layer.experts.w1_EFD, w1[2:])
    with pytest.raises(ValueError, match="sharded already"):
        layer.shard_experts(SecondHalf())
