"""vmoe semantics of the capacity-limited routers: the semi-dual solver's stopping rule (jaxopt ``OptaxSolver``),
the plain quadratic-OT expert-choice router, ``capacity_multiple_of`` on every router that computes a capacity,
and the GShard balance loss (top-1 counts, on the gates the router routed with).
"""

import math

import pytest
import torch

import smoe
from smoe.routing.expert_choice import expert_choice_plan
from smoe.routing.losses import gshard_balance_loss, switch_balance_loss
from smoe.routing.sparsity_constrained import (
    SparsityConstrainedRouter,
    projection_sparse_simplex,
    sparse_semi_dual_plan,
    sparse_semi_dual_solve,
)

F64 = torch.float64

# ---------------------------------------------------------------------------------------------------------------
# 1. the semi-dual solver stops as jaxopt's OptaxSolver does, per group
# ---------------------------------------------------------------------------------------------------------------

#: a group whose similarities already form a transport plan with the right marginals (S = 4, E = 2, S/E = 2).
#: At alpha = 0 each column, divided by b = 2, is (0.375, 0.375, 0.125, 0.125): already on the simplex, so its
#: projection is itself and the plan is 2 * that = the similarities. Every row then sums to 0.75 + 0.25 = 1: the
#: semi-dual gradient a - b * y.sum(2) is exactly 0 (dyadic numbers, exact in float32). Adam's first update is
#: 0 / (0 + eps) = 0, so alpha stays 0.
BALANCED_SE = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.25, 0.75], [0.25, 0.75]])
#: a group that is not balanced at alpha = 0: column 0 / b = (0.495, 0.49, 0.485, 0.05) projects to
#: (0.338, 0.333, 0.328, 0) (the last entry is clipped), so the rows of the plan sum to (0.947, 0.947, 0.947, 1.16)
UNBALANCED_SE = torch.tensor([[0.99, 0.01], [0.98, 0.02], [0.97, 0.03], [0.1, 0.9]])


def test_a_group_already_balanced_stops_after_the_first_step():
    sim = BALANCED_SE.unsqueeze(0)
    plan, steps = sparse_semi_dual_solve(sim, 4)  # tol = 1e-3, vmoe's (jaxopt's default)
    assert steps.tolist() == [1]  # the first step is always taken; its gradient norm 0 <= tol stops the loop
    assert torch.equal(plan, sim)
    plan0, steps0 = sparse_semi_dual_solve(sim, 4, tol=0.0)  # no early stop: the fixed 20 steps
    assert steps0.tolist() == [20]
    assert torch.equal(plan0, sim)  # zero gradient all along: same plan


def test_groups_stop_independently_as_under_vmap():
    sim = torch.stack([BALANCED_SE, UNBALANCED_SE])
    plan, steps = sparse_semi_dual_solve(sim, 4)
    assert steps.tolist() == [1, 20]  # the unbalanced group does not get below tol in 20 Adam steps of 1e-2
    alone, alone_steps = sparse_semi_dual_solve(UNBALANCED_SE.unsqueeze(0), 4, tol=0.0)
    assert alone_steps.tolist() == [20]
    torch.testing.assert_close(plan[1], alone[0], atol=0, rtol=0)  # the other group's stop does not touch it
    assert torch.equal(plan[0], BALANCED_SE)


def test_hand_worked_stop_with_one_nonzero_per_column():
    # S = 2, E = 2 (b = 1), nnz = 1: each column's plan is one-hot on its largest alpha_s + sim[s, j].
    # alpha_0 = 0: column 0 (0.8, 0.7) -> token 0, column 1 (0.3, 0.29) -> token 0: plan [[1, 1], [0, 0]],
    #   g_1 = 1 - row sums = (-1, 1), ||g_1|| = sqrt(2). Adam's first update is lr * g / |g| = (-0.01, 0.01).
    # alpha_1: column 0 (0.79, 0.71) -> token 0, column 1 (0.29, 0.30) -> token 1: plan [[1, 0], [0, 1]], g_2 = 0.
    # jaxopt: stop after step t once ||g_t|| <= tol, with step t's update already applied.
    sim = torch.tensor([[[0.8, 0.3], [0.7, 0.29]]])
    start = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    split = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert torch.equal(sparse_semi_dual_plan(sim, 1, num_iters=0), start)
    for tol, expected_steps in ((1.5, 1), (1e9, 1), (1.4, 2), (1e-3, 2), (0.0, 20)):
        plan, steps = sparse_semi_dual_solve(sim, 1, tol=tol)
        assert steps.tolist() == [expected_steps], tol
        # stopped after step 1 (sqrt(2) <= tol): the plan is at alpha_1, not at alpha_0 (that would be `start`)
        assert torch.equal(plan, split), tol


def jaxopt_reference(sim_SE, nnz, *, tol, maxiter=20, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8):
    """One group, written the way jaxopt runs it (``IterativeSolver._run`` + ``OptaxSolver.update``), in float64:
    ``init_state`` sets ``error = inf``; the first ``update`` is unrolled; then ``while iter_num < maxiter and
    error > tol: update``, where ``update`` takes the gradient at the current params, applies Adam, and stores the
    l2 norm of that gradient as ``error``. Minimises the negated semi-dual, as jaxopt does."""
    S, E = sim_SE.shape
    a, b = 1.0, S / E
    X = sim_SE.double()

    def min_grad(alpha):  # gradient of jaxopt's fun = b . max(alpha + sim) - alpha . a
        y = projection_sparse_simplex((alpha.unsqueeze(1) + X) / b, nnz, dim=0)
        return b * y.sum(1) - a

    def update(params, state):
        g = min_grad(params)
        t = state["iter_num"] + 1
        mu = b1 * state["mu"] + (1 - b1) * g
        nu = b2 * state["nu"] + (1 - b2) * g * g
        delta = -lr * (mu / (1 - b1**t)) / ((nu / (1 - b2**t)).sqrt() + eps)
        return params + delta, {"iter_num": t, "error": float(g.norm()), "mu": mu, "nu": nu}

    params = torch.zeros(S, dtype=F64)
    state = {"iter_num": 0, "error": math.inf, "mu": torch.zeros(S, dtype=F64), "nu": torch.zeros(S, dtype=F64)}
    params, state = update(params, state)
    while state["iter_num"] < maxiter and state["error"] > tol:
        params, state = update(params, state)
    plan = b * projection_sparse_simplex((params.unsqueeze(1) + X) / b, nnz, dim=0)
    return plan, state["iter_num"]


@pytest.mark.parametrize("nnz", [3, 12])
def test_solver_matches_a_jaxopt_shaped_reference(nnz):
    torch.manual_seed(0)
    sim = (3 * torch.randn(3, 12, 4)).softmax(-1)
    # a tol that some group reaches mid-way: the gradient norm of group 0 after a few steps
    _, full = sparse_semi_dual_solve(sim, nnz, tol=0.0)
    assert full.tolist() == [20, 20, 20]
    for tol in (0.5, 1.0, 2.0):
        plan, steps = sparse_semi_dual_solve(sim, nnz, tol=tol)
        for g in range(3):
            ref_plan, ref_steps = jaxopt_reference(sim[g], nnz, tol=tol)
            assert int(steps[g]) == ref_steps, (tol, g)
            torch.testing.assert_close(plan[g].double(), ref_plan, atol=1e-5, rtol=0)
    assert any(int(s) < 20 for tol in (0.5, 1.0, 2.0) for s in sparse_semi_dual_solve(sim, nnz, tol=tol)[1])


def test_router_reports_solver_steps_and_takes_tol():
    torch.manual_seed(0)
    x = torch.randn(2 * 8, 6)
    for tol, expected in ((0.0, 20), (1e9, 1)):
        router = SparsityConstrainedRouter(dim=6, num_experts=4, top_k=1, tol=tol)
        out = router(x, smoe.RoutingContext(group_size=8))
        assert int(out.stats["solver_steps"]) == expected
        assert float(out.stats["solver_steps_mean"]) == expected
    assert SparsityConstrainedRouter(dim=6, num_experts=4, top_k=1).tol == 1e-3  # vmoe's default
    with pytest.raises(ValueError, match="tol"):
        smoe.MoE(6, 8, 4, 1, router="sparsity_constrained", router_kwargs={"tol": -1.0})


# ---------------------------------------------------------------------------------------------------------------
# 2. the plain quadratic-OT expert-choice router (vmoe SparseProjectionTransportTopItemsPerExpertRouter)
# ---------------------------------------------------------------------------------------------------------------


def test_plain_plan_is_the_simplex_projection_hand_worked():
    # S = 4, E = 2 (b = 2), at alpha = 0 (num_iters = 0). Column 0 of sim / b = (0.45, 0.3, 0.15, 0.1) sums to 1:
    # the plain simplex projection keeps it, plan column 0 = b * it = (0.9, 0.6, 0.3, 0.2). With nnz = 2 the
    # k-sparse projection keeps (0.45, 0.3), shifted by theta = (0.75 - 1) / 2 = -0.125: (0.575, 0.425), plan
    # column (1.15, 0.85, 0, 0).
    sim = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]])
    plain = sparse_semi_dual_plan(sim, 4, num_iters=0)
    torch.testing.assert_close(plain[0, :, 0], torch.tensor([0.9, 0.6, 0.3, 0.2]))
    sparse = sparse_semi_dual_plan(sim, 2, num_iters=0)
    torch.testing.assert_close(sparse[0, :, 0], torch.tensor([1.15, 0.85, 0.0, 0.0]))
    # nnz beyond the column length is the plain projection too
    torch.testing.assert_close(sparse_semi_dual_plan(sim, 10, num_iters=0), plain, atol=0, rtol=0)


def _route(router, x, S):
    torch.manual_seed(0)
    return router(x, smoe.RoutingContext(group_size=S))


@pytest.mark.parametrize("training", [True, False])
def test_plain_router_dispatches_top_c_of_the_plain_plan(training):
    G, S, E, K = 2, 16, 4, 2
    torch.manual_seed(3)
    x = torch.randn(G * S, 8)
    plain = SparsityConstrainedRouter(dim=8, num_experts=E, top_k=K, k_sparse=False).train(training)
    with torch.no_grad():
        plain.gate.weight.mul_(100.0)  # decisive scores
    out = _route(plain, x, S)
    c = plain.capacity(S)
    assert c == K * S // E == 8
    probs = plain.logits(x).softmax(-1).view(G, S, E)
    ref_plan, ref_steps = sparse_semi_dual_solve(probs, S)  # nnz = S: no sparsity constraint
    scores = torch.where(ref_plan > 0, ref_plan, probs - 1.0)
    ref = expert_choice_plan(scores, c)
    assert torch.equal(out.plan.token_idx_N, ref.token_idx_N)
    assert torch.equal(out.plan.expert_idx_N, ref.expert_idx_N)
    assert out.plan.counts_E.tolist() == [G * c] * E
    assert int(out.stats["solver_steps"]) == int(ref_steps.max())
    # a k-sparse router whose nnz reaches S (cf = E: c = S) solves the same plain problem
    big = SparsityConstrainedRouter(dim=8, num_experts=E, top_k=K, capacity_factor=float(E))
    big.load_state_dict(plain.state_dict())
    assert big.capacity(S) == S
    plan_big, _ = sparse_semi_dual_solve(probs, big.capacity(S))
    torch.testing.assert_close(plan_big, ref_plan, atol=0, rtol=0)
    # and with nnz = c < S the k-sparse plan differs (the plain one has columns with more than c nonzeros)
    plan_c, _ = sparse_semi_dual_solve(probs, c)
    assert int((plan_c > 0).sum(1).max()) <= c
    assert int((ref_plan > 0).sum(1).max()) > c


def test_plain_router_in_the_layer_fast_equals_reference():
    kw = dict(router="sparsity_constrained", router_kwargs={"k_sparse": False}, dtype=F64)
    ref = smoe.MoE(8, 16, 4, 2, backend="reference", **kw)
    fast = smoe.MoE(8, 16, 4, 2, **kw)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 8, dtype=F64)
    gy = torch.randn_like(x)
    results = []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_(True)
        y, aux = layer(xi)
        aux.plan.validate()
        names, params = zip(*layer.named_parameters())
        grads = torch.autograd.grad((y * gy).sum(), [xi, *params], allow_unused=True)
        results.append((y, [torch.zeros_like(p) if g is None else g for g, p in zip(grads, [xi, *params])]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for g_fast, g_ref in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g_fast, g_ref)


# ---------------------------------------------------------------------------------------------------------------
# 3. capacity_multiple_of on every router that computes a capacity
# ---------------------------------------------------------------------------------------------------------------

G3, S3, E3, D3 = 2, 10, 4, 6  # cf = 1, K = 1: ceil(10 / 4) = 3, rounded up to 4 with capacity_multiple_of = 4


def per_group_expert_counts(plan, S, E):
    """``(G, E)`` kept assignments per routing group and expert."""
    G = plan.num_tokens // S
    counts = torch.zeros(G, E, dtype=torch.long)
    counts.index_put_((plan.token_idx_N // S, plan.expert_idx_N), torch.ones_like(plan.token_idx_N), accumulate=True)
    return counts


def skewed_gate_(router):
    """Every token (positive inputs) prefers expert 0 by far: logits = 50 * sum(x) for expert 0, 0 otherwise."""
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0] = 50.0


#: expert-choice routers: every expert takes exactly c tokens per group
EC_ROUTERS = [
    ("expert_choice", {}),
    ("sinkhorn", {"variant": "expert_choice"}),
    ("sparsity_constrained", {}),
    ("sparsity_constrained", {"k_sparse": False}),
]
#: token-choice-style routers with a capacity factor: an overloaded expert keeps exactly C assignments per group
#: (evaluation mode, where sinkhorn and ssr select by plain top-k: no balancing hides the overflow)
TC_ROUTERS = [
    ("token_choice", {}),
    ("sinkhorn", {}),
    ("sparsity_constrained", {"variant": "token_choice"}),
    ("ssr", {}),
    ("similarity", {}),
    ("xmoe", {}),
]


def build(name, kw, multiple_of, S=S3, E=E3, cf=1.0):
    router = smoe.build_router(
        name, dim=D3, num_experts=E, top_k=1, capacity_factor=cf, capacity_multiple_of=multiple_of, **kw
    )
    return router.eval()


@pytest.mark.parametrize("multiple_of,c", [(1, 3), (4, 4)])
@pytest.mark.parametrize("name,kw", EC_ROUTERS, ids=[f"{n}{kw}" for n, kw in EC_ROUTERS])
def test_expert_choice_capacity_is_rounded_up(name, kw, multiple_of, c):
    router = build(name, kw, multiple_of)
    x = torch.randn(G3 * S3, D3)
    plan = router(x, smoe.RoutingContext(group_size=S3)).plan
    plan.validate()
    assert per_group_expert_counts(plan, S3, E3).tolist() == [[c] * E3] * G3


@pytest.mark.parametrize("name,kw", EC_ROUTERS, ids=[f"{n}{kw}" for n, kw in EC_ROUTERS])
def test_expert_choice_capacity_is_clamped_to_the_group(name, kw):
    # S = 3, E = 2, cf = 1: ceil(1.5) = 2 -> 4 with multiple_of = 4 -> clamped to S = 3 (every token)
    router = build(name, kw, 4, S=3, E=2)
    plan = router(torch.randn(2 * 3, D3), smoe.RoutingContext(group_size=3)).plan
    plan.validate()
    assert per_group_expert_counts(plan, 3, 2).tolist() == [[3, 3], [3, 3]]


def _xmoe_skewed_(router):
    """X-MoE: project every input onto one direction u and give expert 0 the embedding u, the others -u."""
    with torch.no_grad():
        u = torch.ones(router.routing_dim)
        router.projection.weight.copy_(u.unsqueeze(1).expand(-1, D3))
        router.expert_embedding_EP.copy_(-u.expand(E3, -1))
        router.expert_embedding_EP[0] = u


@pytest.mark.parametrize("multiple_of,c", [(1, 3), (4, 4)])
@pytest.mark.parametrize("name,kw", TC_ROUTERS, ids=[f"{n}{kw}" for n, kw in TC_ROUTERS])
def test_token_choice_capacity_is_rounded_up(name, kw, multiple_of, c):
    router = build(name, kw, multiple_of)
    _xmoe_skewed_(router) if name == "xmoe" else skewed_gate_(router)
    x = torch.rand(G3 * S3, D3) + 0.1  # positive: every token's top-1 is expert 0
    plan = router(x, smoe.RoutingContext(group_size=S3)).plan
    plan.validate()
    counts = per_group_expert_counts(plan, S3, E3)
    assert counts[:, 0].tolist() == [c] * G3  # the overloaded expert keeps exactly its capacity
    assert counts.sum().item() == G3 * c  # the other tokens chose expert 0 too and were dropped


@pytest.mark.parametrize("name,kw", TC_ROUTERS, ids=[f"{n}{kw}" for n, kw in TC_ROUTERS])
def test_token_choice_capacity_beyond_the_group_drops_nothing(name, kw):
    # S = 3, E = 4, cf = 1: ceil(0.75) = 1 -> 4 > S: no clamp is needed, an expert simply keeps all 3 tokens
    router = build(name, kw, 4, S=3)
    _xmoe_skewed_(router) if name == "xmoe" else skewed_gate_(router)
    plan = router(torch.rand(2 * 3, D3) + 0.1, smoe.RoutingContext(group_size=3)).plan
    assert per_group_expert_counts(plan, 3, E3)[:, 0].tolist() == [3, 3]


@pytest.mark.parametrize("name", ["expert_choice", "sinkhorn", "sparsity_constrained", "ssr", "similarity", "xmoe"])
def test_capacity_multiple_of_is_validated_and_defaults_to_one(name):
    assert smoe.build_router(name, dim=D3, num_experts=E3, top_k=1).capacity_multiple_of == 1
    with pytest.raises(ValueError, match="capacity_multiple_of"):
        smoe.build_router(name, dim=D3, num_experts=E3, top_k=1, capacity_multiple_of=0)


# ---------------------------------------------------------------------------------------------------------------
# 4. the GShard balance loss
# ---------------------------------------------------------------------------------------------------------------

#: 3 tokens, E = 3, K = 2
PROBS_SE = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.1, 0.3, 0.6]], dtype=F64)
IDX_SK = torch.tensor([[0, 1], [0, 2], [2, 1]])  # each row's top-2, best first


def test_gshard_loss_hand_worked():
    # mean gates me = ((0.5 + 0.6 + 0.1) / 3, (0.3 + 0.1 + 0.3) / 3, (0.2 + 0.3 + 0.6) / 3) = (0.4, 0.7/3, 1.1/3)
    # top-1 choices (0, 0, 2): ce = (2/3, 0, 1/3)
    # GShard l_aux = E^2 * mean_i(ce_i * me_i) = 3 * (2/3 * 0.4 + 0 + 1/3 * 1.1/3) = 3 * (2.4/9 + 1.1/9) = 3.5/3
    probs, idx = PROBS_SE.unsqueeze(0), IDX_SK.unsqueeze(0)
    torch.testing.assert_close(gshard_balance_loss(probs, idx), torch.tensor(3.5 / 3, dtype=F64))
    # the Switch form over both choices: every expert is chosen twice of 6, f = 1/3 each, 3 * (1/3) * 1 = 1
    torch.testing.assert_close(switch_balance_loss(probs, idx), torch.tensor(1.0, dtype=F64))
    # vmoe's expression, verbatim in torch
    E = 3
    ce = torch.nn.functional.one_hot(PROBS_SE.argmax(1), E).to(F64).mean(0)
    torch.testing.assert_close(gshard_balance_loss(probs, idx), (ce * PROBS_SE.mean(0)).mean() * E**2)


def test_gated_router_balance_loss_type():
    router = smoe.build_router("token_choice", dim=4, num_experts=3, top_k=2, balance_loss_type="gshard")
    logits = PROBS_SE.log().unsqueeze(0)
    losses, total = router.standard_losses(logits, PROBS_SE.unsqueeze(0), IDX_SK.unsqueeze(0))
    torch.testing.assert_close(losses["balance"], torch.tensor(3.5 / 3, dtype=F64))
    torch.testing.assert_close(total, 0.01 * losses["balance"])
    assert smoe.build_router("token_choice", dim=4, num_experts=3, top_k=2).balance_loss_type == "switch"
    with pytest.raises(ValueError, match="balance_loss_type"):
        smoe.build_router("token_choice", dim=4, num_experts=3, top_k=2, balance_loss_type="bogus")


@pytest.mark.parametrize("loss_type", ["switch", "gshard"])
def test_noisy_gates_in_the_balance_loss(loss_type):
    # V-MoE noisy gating: vmoe's GShard loss takes the noisy softmax it routed with; the Switch loss keeps the
    # clean probabilities (with the noisy choices), as before
    torch.manual_seed(0)
    T, E, K = 12, 4, 2
    router = smoe.build_router(
        "token_choice",
        dim=8,
        num_experts=E,
        top_k=K,
        noise="gaussian",
        noise_std=8.0,
        balance_loss_type=loss_type,
        balance_loss_weight=1.0,
    ).train()
    x = torch.randn(T, 8)
    torch.manual_seed(1)
    out = router(x, smoe.RoutingContext(group_size=T))
    torch.manual_seed(1)  # the same noise: the router draws it once, after computing the logits
    clean = router.logits(x)
    noisy = clean + (8.0 / E) * torch.randn_like(clean)
    noisy_probs, clean_probs = noisy.softmax(-1), clean.softmax(-1)
    idx = noisy_probs.topk(K, dim=-1).indices.view(1, T, K)
    if loss_type == "gshard":
        expected = gshard_balance_loss(noisy_probs.view(1, T, E), idx)
        other = gshard_balance_loss(clean_probs.view(1, T, E), idx)
    else:
        expected = switch_balance_loss(clean_probs.view(1, T, E), idx)
        other = switch_balance_loss(noisy_probs.view(1, T, E), idx)
    torch.testing.assert_close(out.losses["balance"], expected)
    assert abs(expected.item() - other.item()) > 1e-4  # the noise matters at this scale


def test_hugging_face_load_balancing_loss_is_k_times_switch():
    # HF's load_balancing_loss_func (Mixtral family), one layer, no attention mask:
    # E * sum_{k, e} mean_t onehot(selected[t, k])[e] * mean_t probs[t, e] -- counts divided by T, not T * K
    torch.manual_seed(0)
    T, E, K = 10, 4, 2
    probs = torch.randn(T, E, dtype=F64).softmax(-1)
    selected = probs.topk(K, dim=-1).indices
    tokens_per_expert_KE = torch.nn.functional.one_hot(selected, E).to(F64).mean(0)
    hf = E * (tokens_per_expert_KE * probs.mean(0).unsqueeze(0)).sum()
    torch.testing.assert_close(hf, K * switch_balance_loss(probs.unsqueeze(0), selected.unsqueeze(0)))
