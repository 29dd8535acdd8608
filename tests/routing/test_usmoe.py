"""USMoE unified competitive routing and the training-free router swap."""

import math

import pytest
import torch
from torch import nn

import smoe
from smoe.interop.swap import swap_router
from smoe.routing.token_choice import TokenChoiceRouter
from smoe.routing.usmoe import USMoERouter, unified_scores, usmoe_plan

F64 = torch.float64


def test_unified_score_hand_worked():
    # E = 2, logits [0, ln 3]: softmax = [1/4, 3/4]; sigmoid = [1/2, 3/4], times 2/E = 1 -> [1/2, 3/4]
    # rate 0.5: 0.5 * [0.25, 0.75] + 0.5 * [0.5, 0.75] = [0.375, 0.75]
    s = unified_scores(torch.tensor([[0.0, math.log(3.0)]]), rate=0.5)
    torch.testing.assert_close(s, torch.tensor([[0.375, 0.75]]))
    # rate 0 is the softmax, rate 1 the scaled sigmoid
    torch.testing.assert_close(unified_scores(torch.tensor([[0.0, math.log(3.0)]]), 0.0), torch.tensor([[0.25, 0.75]]))
    torch.testing.assert_close(unified_scores(torch.tensor([[0.0, math.log(3.0)]]), 1.0), torch.tensor([[0.5, 0.75]]))


def test_plan_keeps_the_top_pairs_of_each_group():
    G, S, E, P = 3, 5, 4, 7
    scores = torch.rand(G, S, E)
    plan = usmoe_plan(scores, P)
    plan.validate()
    assert plan.num_rows == G * P
    for g in range(G):
        rows = (plan.token_idx_N // S) == g
        assert int(rows.sum()) == P
        chosen = {(int(t) % S, int(e)) for t, e in zip(plan.token_idx_N[rows], plan.expert_idx_N[rows])}
        assert len(chosen) == P  # distinct pairs
        best = scores[g].reshape(-1).topk(P).indices  # brute force over the S*E pairs
        assert chosen == {(int(i) // E, int(i) % E) for i in best}
        torch.testing.assert_close(plan.weight_N[rows].sum(), scores[g].reshape(-1).topk(P).values.sum())


@pytest.mark.parametrize("group_mode,S", [("batch", 18), ("sequence", 6), ("position", 3)])
def test_layer_selects_exactly_S_times_k_pairs_per_group(group_mode, S):
    E, K = 4, 2
    layer = smoe.MoE(8, 16, E, K, router="usmoe", group_mode=group_mode, dtype=F64)
    with torch.no_grad():
        layer.router.gate.weight.mul_(50)  # uneven scores: some tokens get more than K experts, some fewer
    _, aux = layer(torch.randn(3, 6, 8, dtype=F64))
    plan = aux.plan
    per_group = torch.bincount(plan.token_idx_N // S, minlength=18 // S)
    assert per_group.tolist() == [S * K] * (18 // S)
    per_token = torch.bincount(plan.token_idx_N, minlength=18)
    assert int(per_token.sum()) == 18 * K and int(per_token.max()) <= E


def test_fractional_budget_and_renormalisation():
    layer = smoe.MoE(8, 16, 4, 2, router="usmoe", router_kwargs={"budget": 0.5, "renormalize": True}, dtype=F64)
    _, aux = layer(torch.randn(2, 5, 8, dtype=F64))
    assert aux.plan.num_rows == math.ceil(0.5 * 10 * 2)  # one group of S = 10 tokens, K = 2
    assert layer.router.experts_per_token() == 1.0
    sums = torch.zeros(10).index_add(0, aux.plan.token_idx_N, aux.plan.weight_N)  # router math is float32
    routed = torch.bincount(aux.plan.token_idx_N, minlength=10) > 0
    torch.testing.assert_close(sums[routed], torch.ones(int(routed.sum())))


def test_balance_loss_is_switch_form_on_selected_pairs():
    layer = smoe.MoE(8, 16, 4, 2, router="usmoe", router_kwargs={"balance_loss_weight": 0.1}, dtype=F64)
    x = torch.randn(12, 8, dtype=F64)
    _, aux = layer(x)
    probs = torch.softmax(x.float() @ layer.router.gate.weight.float().t(), dim=-1)
    f = torch.bincount(aux.plan.expert_idx_N, minlength=4).float() / (12 * 2)
    expected = 4 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(aux.losses["balance"], expected)
    torch.testing.assert_close(aux.loss, 0.1 * expected)


def two_hot_inputs(T=12, E=4, K=2, D=4):
    """Tokens whose logits are ~6 on K experts and ~0 elsewhere (identity gate): every token's K softmax
    probabilities (~0.5) beat every other token's non-chosen ones (~0.001), so per-token top-K and the group's
    top-(S*K) select the same pairs."""
    x = 0.01 * torch.randn(T, D, dtype=F64)
    for t in range(T):
        x[t, torch.randperm(E)[:K]] += 6.0
    return x


def test_rate_zero_coincides_with_token_choice_where_top_k_agree():
    tc = smoe.MoE(4, 16, 4, 2, router="token_choice", dtype=F64)
    us = smoe.MoE(4, 16, 4, 2, router="usmoe", router_kwargs={"rate": 0.0}, dtype=F64)
    us.load_state_dict(tc.state_dict())
    with torch.no_grad():
        tc.router.gate.weight.copy_(torch.eye(4))
        us.router.gate.weight.copy_(torch.eye(4))
    x = two_hot_inputs()
    y_tc, _ = tc(x)
    y_us, _ = us(x)
    torch.testing.assert_close(y_us, y_tc)
    # the mixed score (rate 0.5) re-weights the same pairs, so the output changes
    us.router.rate = 0.5
    assert not torch.allclose(us(x)[0], y_tc)


class TinyModel(nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.inp = nn.Linear(4, 4, dtype=F64)
        self.moe1 = smoe.MoE(4, 16, 4, 2, dtype=F64, causal=causal)
        self.moe2 = smoe.MoE(4, 16, 4, 2, dtype=F64, causal=causal)

    def forward(self, x):
        h = x + self.moe1(x)[0]
        return h + self.moe2(h)[0]


def test_swap_copies_gates_and_the_swapped_model_runs():
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # "already trained"
        opt.zero_grad()
        model(torch.randn(2, 6, 4, dtype=F64)).pow(2).mean().backward()
        opt.step()
    old_gates = [model.moe1.router.gate.weight.detach().clone(), model.moe2.router.gate.weight.detach().clone()]
    names = swap_router(model, "usmoe", rate=0.3)
    assert names == ["moe1", "moe2"]
    for moe, old in zip((model.moe1, model.moe2), old_gates):
        assert isinstance(moe.router, USMoERouter) and moe.router.rate == 0.3
        assert torch.equal(moe.router.gate.weight, old)
    y = model(torch.randn(2, 6, 4, dtype=F64))
    assert y.shape == (2, 6, 4) and bool(torch.isfinite(y).all())
    assert swap_router(model, "usmoe") == []  # nothing left to swap


def test_swap_with_rate_zero_preserves_outputs_where_top_k_agree():
    layer = smoe.MoE(4, 16, 4, 2, dtype=F64)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(4))
    x = two_hot_inputs()
    y_before, _ = layer(x)
    swap_router(layer, "usmoe", rate=0.0)
    assert isinstance(layer.router, USMoERouter)
    torch.testing.assert_close(layer(x)[0], y_before)


def test_swap_refuses_a_leak_in_a_causal_model_and_leaves_it_unchanged():
    model = TinyModel(causal=True)
    with pytest.raises(ValueError, match="allow_token_coupling"):
        swap_router(model, "usmoe")
    assert isinstance(model.moe1.router, TokenChoiceRouter) and isinstance(model.moe2.router, TokenChoiceRouter)
    assert not model.moe1.allow_token_coupling
    swap_router(model, "usmoe", allow_token_coupling=True)  # the embedding-evaluation setting, explicitly
    assert isinstance(model.moe2.router, USMoERouter) and model.moe2.allow_token_coupling


def test_swap_needs_a_router_with_a_gate():
    model = TinyModel()
    with pytest.raises(ValueError, match="gate"):
        swap_router(model, "hash")
    assert isinstance(model.moe1.router, TokenChoiceRouter)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"rate": 1.5}, "rate"), ({"budget": 0.0}, "budget"), ({"budget": 1.2}, "budget")],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        smoe.MoE(8, 16, 4, 2, router="usmoe", router_kwargs=kwargs)


def test_capacity_factor_is_refused():
    with pytest.raises(ValueError, match="capacity_factor"):
        smoe.MoE(8, 16, 4, 2, router="usmoe", capacity_factor=1.0)
