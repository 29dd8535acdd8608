"""Sparse-simplex projection, the sparsity-constrained semi-dual OT solver and the ``sparsity_constrained`` router."""

import itertools

import pytest
import torch

import smoe
from smoe.routing.sparsity_constrained import (
    SparsityConstrainedRouter,
    projection_simplex,
    projection_sparse_simplex,
    semi_dual_objective,
    sparse_semi_dual_plan,
)

F64 = torch.float64
E = 4


def simplex_by_bisection(v: torch.Tensor, z: float = 1.0) -> torch.Tensor:
    """Independent simplex projection: find theta with sum(max(v - theta, 0)) = z by bisection (float64)."""
    lo, hi = float(v.min()) - z, float(v.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((v - mid).clamp_min(0).sum()) > z:
            lo = mid
        else:
            hi = mid
    return (v - (lo + hi) / 2).clamp_min(0)


def sparse_projection_brute_force(v: torch.Tensor, k: int, z: float = 1.0) -> torch.Tensor:
    """Closest point of ``{y >= 0, sum y = z, ||y||_0 <= k}``: try every support of size ``<= k``."""
    best, best_dist = None, float("inf")
    n = v.numel()
    for size in range(1, k + 1):
        for support in itertools.combinations(range(n), size):
            idx = torch.tensor(support)
            y = torch.zeros_like(v)
            y[idx] = simplex_by_bisection(v[idx], z)
            dist = float((y - v).pow(2).sum())
            if dist < best_dist - 1e-12:
                best, best_dist = y, dist
    return best


def test_projection_known_values():
    v = torch.tensor([0.6, 0.5, 0.1, -1.0], dtype=F64)
    # full simplex: rho = 3, theta = (1.2 - 1) / 3
    torch.testing.assert_close(projection_simplex(v), torch.tensor([0.6, 0.5, 0.1, 0.0], dtype=F64) - 0.2 / 3 * (v > 0))
    # 2-sparse: keep 0.6 and 0.5, theta = 0.05
    torch.testing.assert_close(projection_sparse_simplex(v, 2), torch.tensor([0.55, 0.45, 0.0, 0.0], dtype=F64))
    torch.testing.assert_close(projection_sparse_simplex(v, 1), torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64))
    # a point of the simplex is its own projection; the scale z
    p = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    torch.testing.assert_close(projection_simplex(p), p)
    torch.testing.assert_close(projection_simplex(torch.zeros(4, dtype=F64), z=2.0), torch.full((4,), 0.5, dtype=F64))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_projection_matches_brute_force(k):
    torch.manual_seed(k)
    for _ in range(20):
        v = torch.randn(5, dtype=F64)
        got = projection_sparse_simplex(v, k, z=1.5)
        assert bool((got >= 0).all()) and int((got > 0).sum()) <= k
        torch.testing.assert_close(got.sum(), torch.tensor(1.5, dtype=F64))
        torch.testing.assert_close(got, sparse_projection_brute_force(v, k, z=1.5), atol=1e-9, rtol=0)


def test_projection_is_batched_along_any_dim():
    torch.manual_seed(0)
    v = torch.randn(3, 6, 4)
    got = projection_sparse_simplex(v, 2, dim=1)
    assert got.shape == v.shape
    torch.testing.assert_close(got.sum(1), torch.ones(3, 4))
    assert int((got > 0).sum(1).max()) <= 2
    for b, j in itertools.product(range(3), range(4)):
        torch.testing.assert_close(got[b, :, j], projection_sparse_simplex(v[b, :, j], 2))
    with pytest.raises(ValueError, match="k must be"):
        projection_sparse_simplex(v, 0)


@pytest.mark.parametrize("sparse,n", [("columns", 24), ("rows", E)])
def test_solver_gradient_is_the_semi_dual_gradient(sparse, n):
    torch.manual_seed(1)
    sim = torch.randn(2, 24, E).softmax(-1)
    alpha = (0.3 * torch.randn(2, n)).requires_grad_(True)
    nnz = 6 if sparse == "columns" else 2
    (grad,) = torch.autograd.grad(semi_dual_objective(alpha, sim, nnz, sparse=sparse).sum(), alpha)
    a, b = (1.0, 6.0) if sparse == "columns" else (6.0, 1.0)
    X = sim if sparse == "columns" else sim.transpose(1, 2)
    y = projection_sparse_simplex((alpha.detach().unsqueeze(2) + X) / b, nnz, dim=1)
    torch.testing.assert_close(grad, a - b * y.sum(2))  # Danskin: the formula the Adam ascent uses


def test_solver_ascends_and_meets_the_sparse_marginal():
    torch.manual_seed(2)
    G, S, c = 3, 24, 8
    sim = torch.randn(G, S, E).softmax(-1)
    for sparse, nnz, dense_dim in [("columns", c, 1), ("rows", 2, 2)]:
        plan = sparse_semi_dual_plan(sim, nnz, sparse=sparse)
        assert bool((plan >= 0).all())
        sparse_sums = plan.sum(1) if sparse == "columns" else plan.sum(2)
        target = S / E if sparse == "columns" else 1.0
        torch.testing.assert_close(sparse_sums, torch.full_like(sparse_sums, target))  # exact marginal
        assert int((plan > 0).sum(dense_dim).max()) <= nnz
        # the Adam ascent improves the semi-dual over its start alpha = 0 and moves the other marginal
        start = sparse_semi_dual_plan(sim, nnz, sparse=sparse, num_iters=0)
        other = (lambda p: p.sum(2) - 1.0) if sparse == "columns" else (lambda p: p.sum(1) - S / E)
        assert float(other(plan).abs().mean()) < float(other(start).abs().mean())


def test_solver_without_sparsity_converges_to_both_marginals():
    # nnz = full size: plain quadratically regularised OT, a smooth concave semi-dual that Adam solves
    torch.manual_seed(3)
    sim = torch.randn(2, 24, E).softmax(-1)
    # tol = 0: all 500 steps (with the default tol = 1e-3 a group stops once its gradient norm is <= 1e-3, and the
    # update of that last step, which jaxopt applies unchecked, can leave the marginal a little farther away)
    plan = sparse_semi_dual_plan(sim, E, sparse="rows", num_iters=500, tol=0.0)
    torch.testing.assert_close(plan.sum(2), torch.ones(2, 24))
    torch.testing.assert_close(plan.sum(1), torch.full((2, E), 6.0), atol=1e-3, rtol=0)
    assert float((sparse_semi_dual_plan(sim, E, sparse="rows").sum(1) - 6).abs().max()) > 1e-2  # 20 steps: not yet


def router_and_input(variant, G=2, S=24, K=2, scale=5.0, seed=0, **kw):
    torch.manual_seed(seed)
    router = SparsityConstrainedRouter(dim=8, num_experts=E, top_k=K, variant=variant, **kw)
    with torch.no_grad():
        router.gate.weight.mul_(scale / 0.02)  # decisive, uneven scores
    return router, torch.randn(G * S, 8)


@pytest.mark.parametrize("training", [True, False])
def test_expert_choice_plan_columns_are_sparse_and_loads_equal_c(training):
    G, S, K = 2, 24, 2
    router, x = router_and_input("expert_choice", G, S, K)
    out = router.train(training)(x, smoe.RoutingContext(group_size=S))
    c = K * S // E  # cf defaults to top_k
    assert router.capacity(S) == c
    plan = out.plan
    plan.validate()
    assert plan.counts_E.tolist() == [G * c] * E  # every expert takes exactly c tokens of each group
    for g in range(G):
        per_expert = torch.bincount(plan.expert_idx_N[plan.token_idx_N // S == g], minlength=E)
        assert per_expert.tolist() == [c] * E
    assert int(out.stats["plan_nnz_per_expert_max"]) <= c
    # the dispatched tokens are the plan's support (plus similarity fill when a column has < c nonzeros)
    probs = router.logits(x).softmax(-1)
    ot = sparse_semi_dual_plan(probs.view(G, S, E), c)
    for g, e in itertools.product(range(G), range(E)):
        rows = (plan.expert_idx_N == e) & (plan.token_idx_N // S == g)
        support = set((ot[g, :, e].nonzero().squeeze(1) + g * S).tolist())
        assert support <= set(plan.token_idx_N[rows].tolist())
    torch.testing.assert_close(plan.weight_N, probs[plan.token_idx_N, plan.expert_idx_N])  # softmax combine
    assert float(out.loss) == 0.0


def test_token_choice_plan_rows_are_k_sparse():
    G, S, K = 2, 24, 2
    router, x = router_and_input("token_choice", G, S, K)
    out = router.train()(x, smoe.RoutingContext(group_size=S))
    plan = out.plan
    assert torch.bincount(plan.token_idx_N, minlength=G * S).tolist() == [K] * (G * S)
    assert int(out.stats["plan_nnz_per_token_max"]) <= K
    probs = router.logits(x).softmax(-1)
    ot = sparse_semi_dual_plan(probs.view(G, S, E), K, sparse="rows").view(G * S, E)
    for t in range(G * S):
        chosen = set(plan.expert_idx_N[plan.token_idx_N == t].tolist())
        assert set(ot[t].nonzero().squeeze(1).tolist()) <= chosen
    torch.testing.assert_close(plan.weight_N, probs[plan.token_idx_N, plan.expert_idx_N])


def test_token_choice_capacity():
    router, x = router_and_input("token_choice", capacity_factor=1.0)
    plan = router.train()(x, smoe.RoutingContext(group_size=24)).plan
    plan.validate()
    per_group = torch.zeros(2, E, dtype=torch.long).index_put_(
        (plan.token_idx_N // 24, plan.expert_idx_N), torch.ones_like(plan.token_idx_N), accumulate=True
    )
    assert int(per_group.max()) <= 24 * 2 // E


def test_in_the_layer():
    layer = smoe.MoE(8, 16, E, 2, router="sparsity_constrained", group_mode="position", dtype=F64)
    assert layer.router.couples_tokens
    y, aux = layer(torch.randn(3, 5, 8, dtype=F64))
    assert y.shape == (3, 5, 8)
    aux.plan.validate()


@pytest.mark.parametrize(
    "kw,bad",
    [
        ({"variant": "bogus"}, "bogus"),
        ({"gamma": 0.0}, "gamma"),
        ({"num_iters": -1}, "-1"),
        ({"lr": -0.1}, "-0.1"),
        ({"noise_std": -2.0}, "-2.0"),
    ],
)
def test_bad_options_raise(kw, bad):
    with pytest.raises(ValueError, match=bad):
        smoe.MoE(8, 16, E, 2, router="sparsity_constrained", router_kwargs=kw)
