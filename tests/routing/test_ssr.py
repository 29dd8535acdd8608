"""Selective Sinkhorn Routing: OT on exactly the selected fraction, gates from the plan, plain top-k otherwise."""

import math

import pytest
import torch

import smoe
from smoe.routing.sinkhorn import sinkhorn_plan
from smoe.routing.ssr import SSRRouter, ot_step_due, plan_top_k

E, K, D = 4, 2, 8


def weights_by_token(plan, T):
    """``(T, E)`` dense combine weights of a sparse plan."""
    return torch.zeros(T, E, dtype=plan.weight_N.dtype).index_put_((plan.token_idx_N, plan.expert_idx_N), plan.weight_N)


def softmax_weights(logits_TE):
    w, idx = logits_TE.softmax(-1).topk(K, -1)
    return torch.zeros_like(logits_TE).scatter(1, idx, w / w.sum(-1, keepdim=True))


def ot_weights(C_GSE, **kw):
    G, S, _ = C_GSE.shape
    idx, w = plan_top_k(sinkhorn_plan(C_GSE, **kw).view(G * S, E), K)
    return torch.zeros(G * S, E).scatter(1, idx, w)


def make_router(seed=0, **kw):
    torch.manual_seed(seed)
    router = SSRRouter(dim=D, num_experts=E, top_k=K, **kw)
    with torch.no_grad():
        router.gate.weight.mul_(100)  # skewed scores: OT gates differ clearly from softmax gates
    return router


@pytest.mark.parametrize("p", [0.01, 0.1, 0.25, 1 / 3, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("n", [1, 7, 99, 100, 1000])
def test_step_schedule_counts_floor_n_p(p, n):
    assert sum(ot_step_due(s, p) for s in range(n)) == math.floor(n * p)


def test_steps_ot_on_exactly_the_selected_fraction_of_training_calls():
    p, n, S = 0.3, 20, 12
    router = make_router(fraction=p)
    ctx = smoe.RoutingContext(group_size=S)
    x = torch.randn(2 * S, D)
    logits = router.logits(x)
    ot_calls = []
    for step in range(n):
        out = router.train()(x, ctx)
        fraction = float(out.stats["ot_fraction"])
        assert fraction in (0.0, 1.0)
        got = weights_by_token(out.plan, 2 * S)
        if fraction == 1.0:
            ot_calls.append(step)
            # gates = the renormalised top-k entries of each row of the plan of C = softmax(logits)
            want = ot_weights(logits.softmax(-1).view(2, S, E), epsilon=0.05, num_iters=100, tol=1e-4)
        else:
            want = softmax_weights(logits)
        torch.testing.assert_close(got, want)
        # an eval call in between neither runs OT nor advances the schedule
        assert float(router.eval()(x, ctx).stats["ot_fraction"]) == 0.0
    assert len(ot_calls) == math.floor(n * p) == 6
    assert ot_calls == [s for s in range(n) if math.floor((s + 1) * p) > math.floor(s * p)]
    assert int(router.ot_step) == n
    # OT and softmax gates really differ on these scores (the comparison above has teeth)
    assert not torch.allclose(ot_weights(logits.softmax(-1).view(2, S, E), epsilon=0.05), softmax_weights(logits))


def test_default_fraction_and_the_schedule_survives_a_checkpoint():
    router = make_router()
    assert router.fraction == 0.01 and router.select == "steps"
    ctx, x = smoe.RoutingContext(group_size=6), torch.randn(6, D)
    fractions = [float(router.train()(x, ctx).stats["ot_fraction"]) for _ in range(100)]
    assert fractions.index(1.0) == 99 and sum(fractions) == 1.0  # call 99 is the first (and only) OT call
    resumed = make_router(seed=1)
    resumed.load_state_dict(router.state_dict())
    assert int(resumed.ot_step) == 100


@pytest.mark.parametrize("p,S", [(0.25, 16), (0.3, 10), (0.5, 6)])
def test_tokens_ot_on_exactly_round_p_s_tokens_per_group(p, S):
    G = 3
    router = make_router(fraction=p, select="tokens", token_rule="low_confidence", cost="logits", epsilon=1.0)
    x = torch.randn(G * S, D)
    out = router.train()(x, smoe.RoutingContext(group_size=S))
    m = math.floor(p * S + 0.5)
    assert router.tokens_per_group(S) == m
    torch.testing.assert_close(out.stats["ot_fraction"], torch.tensor(m / S))
    logits = router.logits(x)
    # the m least confident tokens of every group take their gates from the plan, the others from the softmax
    chosen = logits.softmax(-1).amax(-1).view(G, S).topk(m, dim=1, largest=False).indices
    mask = torch.zeros(G, S, dtype=torch.bool).scatter(1, chosen, True).view(-1, 1)
    want = torch.where(
        mask, ot_weights(logits.view(G, S, E), epsilon=1.0, num_iters=100, tol=1e-4), softmax_weights(logits)
    )
    got = weights_by_token(out.plan, G * S)
    torch.testing.assert_close(got, want)
    rows_from_plan = (got - softmax_weights(logits)).abs().amax(-1) > 1e-6
    assert int(rows_from_plan.sum()) == G * m  # count: exactly m rows per group differ from plain top-k


def test_tokens_random_rule_is_seeded_and_counts():
    S = 20
    router = make_router(fraction=0.2, select="tokens")
    x = torch.randn(2 * S, D)
    ctx = smoe.RoutingContext(group_size=S)
    torch.manual_seed(5)
    a = router.train()(x, ctx)
    torch.manual_seed(5)
    b = router(x, ctx)
    assert torch.equal(a.plan.weight_N, b.plan.weight_N)
    assert float(a.stats["ot_fraction"]) == pytest.approx(4 / 20)
    rows_from_plan = (weights_by_token(a.plan, 2 * S) - softmax_weights(router.logits(x))).abs().amax(-1) > 1e-6
    assert torch.bincount(torch.arange(2 * S)[rows_from_plan] // S, minlength=2).tolist() == [4, 4]


@pytest.mark.parametrize("grad_through_plan", [True, False])
def test_gradient_through_the_plan_is_an_option(grad_through_plan):
    router = make_router(fraction=1.0, grad_through_plan=grad_through_plan, cost="logits", epsilon=1.0)
    router.gate.weight.data.div_(100)  # moderate scores: the Sinkhorn gates have a useful gradient
    x = torch.randn(12, D)
    out = router.train()(x, smoe.RoutingContext(group_size=12))
    assert float(out.stats["ot_fraction"]) == 1.0
    (out.plan.weight_N * torch.randn_like(out.plan.weight_N)).sum().backward()
    grad = router.gate.weight.grad
    if grad_through_plan:
        assert grad is not None and float(grad.abs().sum()) > 0
    else:
        assert grad is None or float(grad.abs().sum()) == 0


def test_eval_is_plain_top_k_without_transport():
    router = make_router(fraction=1.0).eval()
    x = torch.randn(10, D)
    out = router(x, smoe.RoutingContext(group_size=10))
    torch.testing.assert_close(weights_by_token(out.plan, 10), softmax_weights(router.logits(x)))
    assert float(out.stats["ot_fraction"]) == 0.0 and out.losses == {} and int(router.ot_step) == 0


def test_layer_reports_ot_fraction_and_coupling():
    layer = smoe.MoE(D, 16, E, K, router="ssr", router_kwargs={"fraction": 1.0})
    _, aux = layer(torch.randn(2, 5, D))
    assert float(aux.stats["ot_fraction"]) == 1.0 and layer.router.couples_tokens
    assert not smoe.MoE(D, 16, E, K, router="ssr", router_kwargs={"fraction": 0.0}).router.couples_tokens


@pytest.mark.parametrize(
    "kw,bad",
    [
        ({"fraction": 1.5}, "1.5"),
        ({"select": "layers"}, "layers"),
        ({"token_rule": "oracle"}, "oracle"),
        ({"cost": "cosine"}, "cosine"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"num_iters": 0}, "num_iters"),
        ({"tol": 0.0}, "tol"),
    ],
)
def test_bad_options_raise(kw, bad):
    with pytest.raises(ValueError, match=bad):
        smoe.MoE(D, 16, E, K, router="ssr", router_kwargs=kw)
