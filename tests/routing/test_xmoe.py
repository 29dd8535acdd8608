"""X-MoE hypersphere routing: bounded tempered scores, norm invariance, fixed-tau0 balance loss, learnable
temperature, torchscale's variant (renorm to 1.5, random second expert), option checks."""

import math
import re

import pytest
import torch

import smoe
from smoe.routing.capacity import compute_capacity
from smoe.routing.losses import switch_balance_loss
from smoe.routing.xmoe import XMoERouter, xmoe_balance_loss, xmoe_scores

F64 = torch.float64
D, E = 8, 4


def make_router(**kw) -> XMoERouter:
    kw = {"dim": D, "num_experts": E, "top_k": 2, "dtype": F64, **kw}
    return smoe.build_router("xmoe", **kw)


def ctx(T: int) -> smoe.RoutingContext:
    return smoe.RoutingContext(group_size=T)


def route(router, x):
    return router(x, ctx(x.shape[0]))


# --------------------------------------------------------------------------------------------- scores


@pytest.mark.parametrize("gating", ["softmax", "sigmoid"])
@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30], ids=["unit", "tiny", "huge"])
def test_tempered_scores_are_bounded_by_inverse_temperature(gating, scale):
    router = make_router(gating=gating, temperature_init=0.05)
    tau = float(router.temperature().detach())
    x = torch.randn(64, D, dtype=F64) * scale
    # adversarial rows: tokens whose projection points exactly along (or against) an expert embedding
    W = router.projection.weight.detach().double()
    e = router.expert_embedding_EP.detach().double()
    x_align = (torch.linalg.pinv(W) @ e.T).T * scale  # W x_align[i] = e_i
    x = torch.cat([x, x_align, -x_align])
    logits = router.logits(x)
    assert logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())
    assert float(logits.detach().abs().max()) <= (1.0 / tau) * (1 + 1e-5)
    # the bound is attained: an aligned token scores cos = 1 with its expert, tempered to 1/tau
    aligned = logits[64 : 64 + E].diagonal()
    torch.testing.assert_close(aligned, torch.full((E,), 1.0 / tau), rtol=1e-5, atol=0)
    out = route(router, x)
    out.plan.validate()
    assert bool(torch.isfinite(out.loss))


def test_torchscale_logits_are_unbounded():
    # no token normalisation: the logits grow with ||x|| (the paper's bound does not hold)
    router = make_router(variant="torchscale")
    x = torch.randn(16, D, dtype=F64)
    small, big = router.logits(x), router.logits(1000 * x)
    torch.testing.assert_close(big, 1000 * small, rtol=1e-4, atol=1e-4)
    assert float(big.detach().abs().max()) > 10.0


def test_scores_are_cosines_hand_worked():
    # W = I (P = D = 2); x = (3, 4) -> W x / ||W x|| = (0.6, 0.8)
    # e_0 = (2, 0) -> (1, 0): cos = 0.6; e_1 = (0, -5) -> (0, -1): cos = -0.8
    x = torch.tensor([[3.0, 4.0]])
    e = torch.tensor([[2.0, 0.0], [0.0, -5.0]])
    torch.testing.assert_close(xmoe_scores(x, torch.eye(2), e), torch.tensor([[0.6, -0.8]]))
    # torchscale: only e normalised: (3, 4) . (1, 0) = 3, (3, 4) . (0, -1) = -4
    torch.testing.assert_close(xmoe_scores(x, torch.eye(2), e, normalize_tokens=False), torch.tensor([[3.0, -4.0]]))


# ------------------------------------------------------------------------------------- norm invariance


@pytest.mark.parametrize("gating", ["softmax", "sigmoid"])
def test_paper_routing_ignores_the_token_norm(gating):
    router = make_router(gating=gating).eval()
    x = torch.randn(32, D, dtype=F64)
    base = route(router, x).plan
    for c in (2.0**-20, 2.0**12):  # powers of two: the scaled input is exact, so is the plan
        plan = route(router, c * x).plan
        assert torch.equal(plan.token_idx_N, base.token_idx_N) and torch.equal(plan.expert_idx_N, base.expert_idx_N)
        assert torch.equal(plan.weight_N, base.weight_N)
    for c in (1e-3, 7.3, 1e4):
        plan = route(router, c * x).plan
        assert torch.equal(plan.expert_idx_N, base.expert_idx_N)
        torch.testing.assert_close(plan.weight_N, base.weight_N, rtol=1e-5, atol=1e-6)


def test_torchscale_routing_depends_on_the_token_norm():
    router = make_router(variant="torchscale").eval()
    x = torch.randn(32, D, dtype=F64)
    base, scaled = route(router, x).plan, route(router, 8.0 * x).plan
    # the argmax is scale-free, the softmax combine weights are not
    assert torch.equal(scaled.expert_idx_N, base.expert_idx_N)
    assert not torch.allclose(scaled.weight_N, base.weight_N, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------- balance loss


def test_balance_loss_uses_fixed_tau0_hand_worked():
    # G = 1, S = 2, E = 2, K = 1; both tokens choose expert 0, so f = (1, 0) and L = E * P_0 = 2 * P_0
    # tau0 = 0.3: s/tau0 = (1, 0) and (2, 0); softmax_0 = e/(e+1) = 0.731059, e^2/(e^2+1) = 0.880797
    # P_0 = (0.731059 + 0.880797) / 2 = 0.805928 -> L = 1.611856
    scores = torch.tensor([[[0.3, 0.0], [0.6, 0.0]]])
    idx = torch.zeros(1, 2, 1, dtype=torch.long)
    torch.testing.assert_close(xmoe_balance_loss(scores, idx, 0.3), torch.tensor(1.611856), rtol=1e-6, atol=1e-6)
    # the un-tempered softmax would give softmax_0 = 0.574443, 0.645656 -> L = 2 * 0.610050 = 1.220099
    torch.testing.assert_close(xmoe_balance_loss(scores, idx, 1.0), torch.tensor(1.220099), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gating,tau0", [("softmax", 0.3), ("sigmoid", 0.07)])
def test_router_balance_loss_ignores_the_gating_temperature(gating, tau0):
    x = torch.randn(24, D, dtype=F64)
    hot = make_router(gating=gating, temperature_init=1.0).train()
    cold = make_router(gating=gating, temperature_init=0.02).train()
    cold.load_state_dict({**hot.state_dict(), "log_temperature": cold.log_temperature.detach()})
    assert hot.balance_temperature == tau0
    out_hot, out_cold = route(hot, x), route(cold, x)
    # same selection, same tau0-loss, different combine weights
    assert torch.equal(out_hot.plan.expert_idx_N, out_cold.plan.expert_idx_N)
    assert not torch.allclose(out_hot.plan.weight_N, out_cold.plan.weight_N)
    torch.testing.assert_close(out_hot.losses["balance"], out_cold.losses["balance"])
    # ... and it is the Switch loss on softmax(s / tau0), with the K = 2 choices
    s = hot.scores(x).view(1, 24, E)
    idx = s.topk(2, dim=-1).indices
    torch.testing.assert_close(out_hot.losses["balance"], switch_balance_loss((s / tau0).softmax(-1), idx))
    torch.testing.assert_close(out_hot.loss, 0.01 * out_hot.losses["balance"])
    # the balance loss does not train the temperature
    (g,) = torch.autograd.grad(out_hot.losses["balance"], [hot.log_temperature], allow_unused=True)
    assert g is None or float(g.abs()) == 0.0


def test_torchscale_balance_loss_is_fairseq_l_aux():
    router = make_router(variant="torchscale").train()
    x = torch.randn(20, D, dtype=F64)
    torch.manual_seed(1)
    out = route(router, x)
    # fairseq top2gating: l_aux = E^2 * mean(me * ce), me = mean softmax(logits), ce = share of top-1 choices
    gates = router.logits(x).softmax(-1)
    me = gates.mean(0)
    ce = torch.nn.functional.one_hot(gates.argmax(-1), E).float().mean(0)
    torch.testing.assert_close(out.losses["balance"], E * E * (me * ce).mean())


# ------------------------------------------------------------------------------------------ temperature


def test_temperature_is_learnable_in_the_paper_variant():
    layer = smoe.MoE(D, 16, E, 1, router="xmoe", dtype=F64).train()
    router = layer.router
    assert isinstance(router.log_temperature, torch.nn.Parameter)
    torch.testing.assert_close(float(router.temperature().detach()), 0.3)  # tau0 of softmax gating (unconfirmed init)
    y, aux = layer(torch.randn(2, 5, D, dtype=F64))
    (y * torch.randn_like(y)).sum().backward()
    assert router.log_temperature.grad is not None and float(router.log_temperature.grad.abs()) > 0
    assert float(aux.stats["temperature"]) == pytest.approx(0.3)


def test_fixed_temperature_and_torchscale_have_no_temperature_parameter():
    fixed = make_router(learn_temperature=False, temperature_init=0.5)
    assert "log_temperature" in dict(fixed.named_buffers())
    assert all("temperature" not in n for n, _ in fixed.named_parameters())
    torch.testing.assert_close(float(fixed.temperature().detach()), 0.5)
    ts = make_router(variant="torchscale")
    assert ts.temperature() is None
    assert all("temperature" not in n for n in dict(ts.state_dict()))
    assert {n for n, _ in ts.named_parameters()} == {"projection.weight", "expert_embedding_EP"}


def test_temperature_floor():
    router = make_router(temperature_init=0.01, min_temperature=0.01)
    with torch.no_grad():
        router.log_temperature.fill_(-50.0)  # exp(-50) ~ 2e-22, floored
    assert float(router.temperature().detach()) == pytest.approx(0.01)
    assert float(router.logits(torch.randn(8, D)).detach().abs().max()) <= 100.0 * (1 + 1e-5)


# ------------------------------------------------------------------------------------------ routing dim


@pytest.mark.parametrize(
    "variant,num_experts,expected",
    [("paper", 32, 16), ("paper", 4, 2), ("paper", 7, 3), ("paper", 2, 2), ("torchscale", 4, 16)],
)
def test_routing_dim_default(variant, num_experts, expected):
    router = smoe.build_router("xmoe", dim=D, num_experts=num_experts, top_k=1, variant=variant)
    assert router.routing_dim == expected
    assert router.projection.weight.shape == (expected, D)
    assert router.expert_embedding_EP.shape == (num_experts, expected)


# ----------------------------------------------------------------------------------------- torchscale


def test_torchscale_renorm_keeps_expert_norms_at_1_5():
    router = make_router(variant="torchscale")
    x = torch.randn(12, D, dtype=F64)
    norms = router.expert_embedding_EP.detach().norm(dim=1)
    assert not torch.allclose(norms, torch.full((E,), 1.5, dtype=F64))  # orthogonal init, gain 0.32
    route(router.eval(), x)
    assert torch.equal(router.expert_embedding_EP.detach().norm(dim=1), norms)  # evaluation writes nothing
    for _ in range(2):
        out = route(router.train(), x)
        torch.testing.assert_close(router.expert_embedding_EP.detach().norm(dim=1), torch.full((E,), 1.5, dtype=F64))
        out.loss.backward()  # the in-place renorm happened before the graph was built: backward works
        assert router.expert_embedding_EP.grad is not None
        with torch.no_grad():  # an "optimizer step" that moves the norms away from 1.5
            router.expert_embedding_EP.mul_(3.0).add_(router.expert_embedding_EP.grad)
        router.zero_grad()
    # the paper variant has no renorm
    paper = make_router()
    route(paper.train(), x)
    assert not torch.allclose(paper.expert_embedding_EP.detach().norm(dim=1), torch.full((E,), 1.5, dtype=F64))


def test_torchscale_renorm_does_not_change_the_output():
    router = make_router(variant="torchscale").eval()
    x = torch.randn(12, D, dtype=F64)
    before = route(router, x).plan.weight_N
    router.renormalize_expert_embeddings_()
    torch.testing.assert_close(route(router, x).plan.weight_N, before, rtol=1e-6, atol=1e-7)


def test_torchscale_random_second_expert():
    T = 4000
    router = make_router(variant="torchscale").train()
    assert router.second_expert_policy == "random" and router.renormalize
    with torch.no_grad():
        router.projection.weight.mul_(3.0)  # sharper gates: g_2 well inside (0, 1/2)
    x = torch.randn(T, D, dtype=F64)
    torch.manual_seed(3)
    plan = route(router, x).plan
    per_token = torch.bincount(plan.token_idx_N, minlength=T)
    assert int(per_token.min()) >= 1 and int(per_token.max()) <= 2  # the top-1 choice is always kept
    # P(keep 2nd) = 2 * g_2 with g_2 the renormalised second weight
    g2 = router.logits(x).detach().softmax(-1).topk(2, dim=-1).values
    g2 = g2[:, 1] / g2.sum(-1)
    expected = float((2 * g2).mean())
    assert 0.2 < expected < 0.95
    assert abs(float((per_token == 2).float().mean()) - expected) < 0.03
    # evaluation keeps every second choice (deterministic)
    assert route(router.eval(), x).plan.num_rows == 2 * T


def test_unsampled_second_choices_take_no_capacity():
    T = 64
    router = make_router(variant="torchscale").train()
    x = torch.randn(T, D, dtype=F64)
    torch.manual_seed(5)
    free = route(router, x).plan  # dropless: shows which second choices were sampled
    router.capacity_factor = 1.0
    torch.manual_seed(5)  # the same draw
    capped = route(router, x).plan
    C = compute_capacity(T, E, 1.0, 2)
    first = router.logits(x).argmax(-1)
    for e in range(E):
        n1 = int((first == e).sum())
        rows = free.expert_idx_N == e
        sampled2 = int(rows.sum()) - n1
        kept = int((capped.expert_idx_N == e).sum())
        # top-1 choices are placed first; sampled second choices fill what is left, unsampled ones take nothing
        assert kept == min(C, n1) + min(max(C - n1, 0), sampled2)


# ------------------------------------------------------------------------------------ gating, capacity


def test_sigmoid_gating_weights():
    router = make_router(gating="sigmoid", top_k=1).eval()
    x = torch.randn(10, D, dtype=F64)
    plan = route(router, x).plan
    logits = router.logits(x)
    expected = torch.sigmoid(logits.max(-1).values)[plan.token_idx_N]
    torch.testing.assert_close(plan.weight_N, expected)
    assert router.balance_temperature == 0.07 and float(router.temperature().detach()) == pytest.approx(0.07)


def test_softmax_top1_weight_is_tempered_softmax():
    router = make_router(top_k=1, temperature_init=0.1).eval()
    x = torch.randn(10, D, dtype=F64)
    plan = route(router, x).plan
    s = router.scores(x)
    expected = (s / 0.1).softmax(-1).max(-1).values[plan.token_idx_N]
    torch.testing.assert_close(plan.weight_N, expected)


@pytest.mark.parametrize("gating", ["softmax", "sigmoid"])
def test_selection_is_on_the_scores_even_when_the_gates_saturate(gating):
    # tau = 1e-3: sigmoid(s/tau) rounds to 1 and softmax(s/tau) underflows to 0 in float32, so choosing on the
    # gates would tie; the choice is argmax s (paper), exactly as at a mild temperature
    x = torch.randn(32, D, dtype=F64)
    cold = make_router(gating=gating, temperature_init=1e-3, min_temperature=1e-4).eval()
    with torch.no_grad():
        gates = torch.sigmoid(cold.logits(x)) if gating == "sigmoid" else cold.logits(x).softmax(-1)
    assert int((gates.topk(2, dim=-1).values[:, 1] == gates.topk(3, dim=-1).values[:, 2]).sum()) > 0  # ties exist
    expected = cold.scores(x).topk(2, dim=-1).indices
    plan = route(cold, x).plan
    chosen = torch.zeros(32, E, dtype=torch.bool)
    chosen[plan.token_idx_N, plan.expert_idx_N] = True
    assert torch.equal(chosen, torch.zeros(32, E, dtype=torch.bool).scatter_(1, expected, True))


def test_capacity_couples_tokens_like_token_choice():
    for cf in (None, 1.0):
        xmoe = make_router(capacity_factor=cf)
        tc = smoe.build_router("token_choice", dim=D, num_experts=E, top_k=2, capacity_factor=cf)
        assert xmoe.couples_tokens is tc.couples_tokens is (cf is not None)
    router = make_router(capacity_factor=0.5, top_k=1).eval()
    with torch.no_grad():
        router.expert_embedding_EP[1:].copy_(-router.expert_embedding_EP[:1])  # most tokens pick expert 0 or not
    plan = route(router, torch.randn(40, D, dtype=F64)).plan
    assert int(plan.counts_E.max()) <= compute_capacity(40, E, 0.5, 1) == 5
    assert plan.num_rows < 40


@pytest.mark.parametrize("kw", [{}, {"variant": "torchscale", "top_k": 2}, {"gating": "sigmoid", "top_k": 1}])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fast_engine_equals_reference_with_capacity(kw, training):
    # the contract suite covers the defaults; here capacity, torchscale's renorm and random second expert
    kw = dict(kw)
    K = kw.pop("top_k", 2)
    layers = [
        smoe.MoE(D, 16, E, K, router="xmoe", capacity_factor=1.0, backend=b, dtype=F64, router_kwargs=kw)
        for b in ("reference", "fast")
    ]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 6, D, dtype=F64)
    gy = torch.randn_like(x)
    results = []
    for layer in layers:
        layer.train(training)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(0)
        y, aux = layer(xi)
        params = [p for p in layer.parameters()]
        grads = torch.autograd.grad((y * gy).sum() + aux.loss, [xi, *params], allow_unused=True)
        results.append((y.detach(), [torch.zeros(()) if g is None else g for g in grads]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-10, rtol=1e-8)
    for g_fast, g_ref in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kw,shown",
    [
        ({"variant": "fairseq"}, "'fairseq'"),
        ({"gating": "relu"}, "'relu'"),
        ({"routing_dim": 1}, "1"),
        ({"routing_dim": 0, "variant": "torchscale"}, "0"),
        ({"temperature_init": 0.0}, "0.0"),
        ({"temperature_init": -0.5}, "-0.5"),
        ({"temperature_init": 1e-6}, "1e-06"),
        ({"min_temperature": 0.0}, "0.0"),
        ({"balance_temperature": 0.0}, "0.0"),
        ({"balance_loss_weight": -1.0}, "-1.0"),
        ({"second_expert_policy": "sampling"}, "'sampling'"),
        ({"second_expert_policy": "random", "top_k": 3}, "top_k=3"),
        ({"top_k": 5}, "5"),
        ({"capacity_factor": 0.0}, "0.0"),
        ({"variant": "torchscale", "gating": "sigmoid"}, "'sigmoid'"),
        ({"variant": "torchscale", "temperature_init": 0.1}, "temperature_init=0.1"),
        ({"variant": "torchscale", "balance_temperature": 0.07}, "balance_temperature=0.07"),
        ({"variant": "torchscale", "learn_temperature": True}, "learn_temperature=True"),
    ],
)
def test_bad_options_raise_value_error_naming_the_value(kw, shown):
    with pytest.raises(ValueError, match=re.escape(shown)):
        make_router(**kw)


def test_unknown_option_is_refused_by_the_registry():
    with pytest.raises(ValueError, match="xmoe"):
        make_router(noise="gaussian")


def test_log_temperature_init_value():
    router = make_router(temperature_init=0.25)
    torch.testing.assert_close(float(router.log_temperature.detach()), math.log(0.25))
