"""Sinkhorn solver and the ``sinkhorn`` router (S-BASE / Megatron / vmoe Sinkhorn token and expert choice)."""

import pytest
import torch

import smoe
from smoe.routing.sinkhorn import SinkhornRouter, sinkhorn_plan, sinkhorn_plan_reference
from smoe.routing.token_choice import TokenChoiceRouter

E = 4


def ctx(S):
    return smoe.RoutingContext(group_size=S)


@pytest.mark.parametrize("tol", [1e-3, 1e-5])
def test_solver_marginals(tol):
    torch.manual_seed(0)
    G, S = 3, 16
    scores = 2.0 * torch.randn(G, S, E)
    plan = sinkhorn_plan(scores, num_iters=1000, tol=tol)
    assert plan.shape == (G, S, E) and plan.dtype == torch.float32 and bool((plan >= 0).all())
    torch.testing.assert_close(plan.sum(-1), torch.ones(G, S), atol=1e-5, rtol=0)  # rows exact (last update)
    col_err = (plan.sum(1) / (S / E) - 1).abs().max()
    assert float(col_err) <= tol + 1e-5


def test_solver_without_tolerance_runs_the_iterations_and_is_unbalanced_after_one():
    torch.manual_seed(1)
    scores = 3.0 * torch.randn(2, 12, E)
    one = sinkhorn_plan(scores, num_iters=1)
    many = sinkhorn_plan(scores, num_iters=200)
    assert float((one.sum(1) - 3).abs().max()) > 1e-2  # one iteration is not balanced yet on these scores
    torch.testing.assert_close(many.sum(1), torch.full((2, E), 3.0), atol=1e-4, rtol=0)


def test_solver_custom_marginals_and_unbatched_input():
    torch.manual_seed(2)
    scores = torch.randn(10, 5)
    plan = sinkhorn_plan(scores, row_marginal=0.5, num_iters=500)
    assert plan.shape == (10, 5)
    torch.testing.assert_close(plan.sum(1), torch.full((10,), 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.sum(0), torch.full((5,), 1.0), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unbalanced"):
        sinkhorn_plan(scores, col_marginal=3.0)


@pytest.mark.parametrize("epsilon", [1.0, 0.5])
def test_log_domain_matches_plain_domain(epsilon):
    torch.manual_seed(3)
    scores = torch.randn(6, 3)
    ref = sinkhorn_plan_reference(scores, epsilon=epsilon, num_iters=7)  # few iterations: not yet converged
    got = sinkhorn_plan(scores, epsilon=epsilon, num_iters=7)
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)
    # batched groups are solved independently
    batched = sinkhorn_plan(torch.stack([scores, 2 * scores]), epsilon=epsilon, num_iters=7)
    torch.testing.assert_close(batched[0], got)
    ref2 = sinkhorn_plan_reference(2 * scores, epsilon=epsilon, num_iters=7)
    torch.testing.assert_close(batched[1].double(), ref2, atol=1e-6, rtol=1e-5)


def test_log_domain_survives_a_small_epsilon():
    torch.manual_seed(4)
    scores = 5.0 * torch.randn(8, E)
    assert not bool(torch.isfinite(sinkhorn_plan_reference(scores, epsilon=0.005)).all())  # exp(1000) overflows
    plan = sinkhorn_plan(scores, epsilon=0.005, num_iters=2000, tol=1e-4)
    assert bool(torch.isfinite(plan).all())
    torch.testing.assert_close(plan.sum(-1), torch.ones(8), atol=1e-5, rtol=0)


def test_solver_rejects_bad_options():
    with pytest.raises(ValueError, match="-1.0"):
        sinkhorn_plan(torch.zeros(4, 2), epsilon=-1.0)
    with pytest.raises(ValueError, match="num_iters"):
        sinkhorn_plan(torch.zeros(4, 2), num_iters=0)
    with pytest.raises(ValueError, match="tol"):
        sinkhorn_plan(torch.zeros(4, 2), tol=0.0)


def skewed(S=512, K=1, seed=0, **kw):
    """A router whose logits are ``N(0, 1) + 3`` on expert 0 and ``N(0, 1)`` elsewhere, and its input."""
    torch.manual_seed(seed)
    D = E + 1
    router = SinkhornRouter(dim=D, num_experts=E, top_k=K, **kw)
    x = torch.cat([torch.randn(S, E), torch.ones(S, 1)], dim=1)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[:, :E] = torch.eye(E)
        router.gate.weight[0, E] = 3.0
    return router, x


def loads(plan):
    return torch.bincount(plan.expert_idx_N, minlength=E).float()


@pytest.mark.parametrize("K", [1, 2])
def test_training_balances_skewed_logits(K):
    S = 512
    router, x = skewed(S, K)
    uniform = S * K / E
    plain = loads(router.eval()(x, ctx(S)).plan)
    assert float(plain.max()) > 1.7 * uniform  # plain top-k piles onto expert 0
    balanced = loads(router.train()(x, ctx(S)).plan)
    # stated tolerance: every expert's training load within 10% of the uniform load S*K/E
    assert float((balanced / uniform - 1).abs().max()) <= 0.10, balanced.tolist()


def test_training_selects_top_k_of_the_plan_and_combines_softmax():
    S, K = 64, 2
    router, x = skewed(S, K)
    out = router.train()(x, ctx(S))
    logits = router.logits(x)
    expected_idx = sinkhorn_plan(logits.view(1, S, E)).view(S, E).topk(K, -1).indices
    plan = out.plan
    chosen = {(int(t), int(e)) for t, e in zip(plan.token_idx_N, plan.expert_idx_N)}
    assert chosen == {(t, int(e)) for t in range(S) for e in expected_idx[t]}
    torch.testing.assert_close(plan.weight_N, logits.softmax(-1)[plan.token_idx_N, plan.expert_idx_N])
    assert out.losses == {} and float(out.loss) == 0.0  # no aux loss by default


def test_eval_equals_plain_top_k():
    S, K = 40, 2
    router, x = skewed(S, K)
    plain = TokenChoiceRouter(dim=E + 1, num_experts=E, top_k=K)
    plain.load_state_dict(router.state_dict())
    got, want = router.eval()(x, ctx(S)).plan, plain.eval()(x, ctx(S)).plan
    for name in ("token_idx_N", "expert_idx_N", "weight_N", "counts_E"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    # vmoe's choice: select on the plan at eval too -> balanced, unlike plain top-k
    router_vmoe, _ = skewed(S, K, eval_sinkhorn=True)
    assert not torch.equal(loads(router_vmoe.eval()(x, ctx(S)).plan), loads(want))


def test_sigmoid_gate_for_top_1():
    S = 16
    router, x = skewed(S, 1, score_fn="sigmoid")
    plan = router.train()(x, ctx(S)).plan
    torch.testing.assert_close(plan.weight_N, torch.sigmoid(router.logits(x))[plan.token_idx_N, plan.expert_idx_N])


def test_expert_choice_variant_fills_every_expert_with_its_top_c_plan_tokens():
    G, S, K = 2, 32, 2
    router, x = skewed(G * S, K, variant="expert_choice")
    out = router.train()(x, ctx(S))
    plan = out.plan
    c = 2 * S // E  # cf defaults to top_k
    assert plan.counts_E.tolist() == [G * c] * E
    logits = router.logits(x)
    plan_GSE = sinkhorn_plan(logits.view(G, S, E))
    for g in range(G):
        for e in range(E):
            rows = (plan.expert_idx_N == e) & (plan.token_idx_N // S == g)
            want = set((plan_GSE[g, :, e].topk(c).indices + g * S).tolist())
            assert set(plan.token_idx_N[rows].tolist()) == want
    torch.testing.assert_close(plan.weight_N, logits.softmax(-1)[plan.token_idx_N, plan.expert_idx_N])


def test_capacity_drops_overflow():
    S, K = 64, 2
    router, x = skewed(S, K, capacity_factor=1.0)
    for training in (True, False):
        plan = router.train(training)(x, ctx(S)).plan
        plan.validate()
        assert int(plan.counts_E.max()) <= S * K // E
    assert plan.num_rows < S * K  # the skewed eval top-k overflows expert 0


def test_in_the_layer_and_registry():
    layer = smoe.MoE(8, 16, E, 2, router="sinkhorn", router_kwargs={"num_iters": 5, "tol": 1e-3})
    assert isinstance(layer.router, SinkhornRouter) and layer.router.couples_tokens
    y, aux = layer(torch.randn(2, 6, 8))
    assert y.shape == (2, 6, 8)
    aux.plan.validate()


@pytest.mark.parametrize(
    "kw,bad",
    [
        ({"variant": "bogus"}, "bogus"),
        ({"score_fn": "relu"}, "relu"),
        ({"epsilon": 0.0}, "0.0"),
        ({"num_iters": 0}, "num_iters"),
        ({"tol": -1.0}, "-1.0"),
        ({"noise_std": -0.5}, "-0.5"),
        ({"variant": "expert_choice", "score_fn": "sigmoid"}, "sigmoid"),
    ],
)
def test_bad_options_raise(kw, bad):
    with pytest.raises(ValueError, match=bad):
        smoe.MoE(8, 16, E, 2, router="sinkhorn", router_kwargs=kw)
