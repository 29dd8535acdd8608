"""Token-choice options that the Hugging Face MoE families need, on hand-worked inputs: group-limited routing
(DeepSeek-V2/V3), the routed scaling factor, L_p renormalisation (DBRX), an absolute expert capacity (Switch,
NLLB-MoE), the unbiased balance count (ERNIE-4.5), and the layer's input-side weighting (Llama-4)."""

from __future__ import annotations

import math

import pytest
import torch

import smoe
from smoe.routing.base import RoutingContext
from smoe.routing.token_choice import TokenChoiceRouter, group_limited_mask, top_k_choice


def test_group_limited_mask_keeps_the_groups_with_the_best_top2_sum():
    # E = 6 experts in 3 groups of 2: scores (0.9, 0.0 | 0.5, 0.5 | 0.3, 0.2)
    # top-2 sums: 0.9, 1.0, 0.5 -> the best group is the 2nd, then the 1st; topk_groups=1 keeps only group 2
    s = torch.tensor([[0.9, 0.0, 0.5, 0.5, 0.3, 0.2]])
    assert group_limited_mask(s, 3, 1).tolist() == [[False, False, True, True, False, False]]
    # group max: 0.9, 0.5, 0.3 -> group 1 (DeepSeek-V2 group_limited_greedy)
    assert group_limited_mask(s, 3, 1, "max").tolist() == [[True, True, False, False, False, False]]
    assert group_limited_mask(s, 3, 2).tolist() == [[True, True, True, True, False, False]]


def test_top_k_inside_the_kept_groups_differs_from_plain_top_k():
    logits = torch.tensor([[2.0, -9.0, 1.0, 1.0, -9.0, -9.0]])
    plain, _, _ = top_k_choice(logits, 2, score_fn="sigmoid")
    grouped, w, _ = top_k_choice(logits, 2, score_fn="sigmoid", num_groups=3, topk_groups=1, renormalize=True)
    assert set(plain[0].tolist()) == {0, 2} or set(plain[0].tolist()) == {0, 3}  # expert 0 is the best alone
    assert set(grouped[0].tolist()) == {2, 3}  # group 2's top-2 sum 2*sigmoid(1) > sigmoid(2) + sigmoid(-9)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5]]))


def test_routed_scaling_factor_and_lp_renormalisation():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))  # softmax = (0.6, 0.3, 0.1)
    _, w, _ = top_k_choice(logits, 2, renormalize=True, renormalize_p=2.0, scale=2.5)
    # kept (0.6, 0.3); L2 norm sqrt(0.45); times 2.5
    norm = math.sqrt(0.6**2 + 0.3**2)
    torch.testing.assert_close(w, torch.tensor([[0.6 / norm * 2.5, 0.3 / norm * 2.5]]))
    _, w1, _ = top_k_choice(logits, 2, renormalize=True, renormalize_p=1.0)
    torch.testing.assert_close(w1, torch.tensor([[2 / 3, 1 / 3]]))


def _router(**kw):
    torch.manual_seed(0)
    return TokenChoiceRouter(dim=4, num_experts=2, top_k=1, **{"balance_loss_weight": 0.0, **kw})


def test_absolute_expert_capacity_keeps_the_first_tokens_of_each_expert_per_group():
    router = _router(expert_capacity=2)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    # 6 tokens in 2 groups of 3; all prefer expert 0 (x[0] > 0): each group keeps its first 2
    x = torch.tensor([[1.0, 0, 0, 0]]).repeat(6, 1)
    plan = router(x, RoutingContext(group_size=3)).plan
    assert sorted(plan.token_idx_N.tolist()) == [0, 1, 3, 4]
    assert router.couples_tokens
    # the same capacity whatever the group size (a relative capacity_factor would grow with it)
    plan = router(x, RoutingContext(group_size=6)).plan
    assert sorted(plan.token_idx_N.tolist()) == [0, 1]


def test_balance_count_unbiased_counts_the_top_k_without_the_selection_bias():
    router = _router(expert_bias=True, balance_loss_weight=1.0, balance_count="unbiased")
    routed = _router(expert_bias=True, balance_loss_weight=1.0)
    routed.load_state_dict(router.state_dict())
    with torch.no_grad():
        for r in (router, routed):
            r.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, 0]]))
            r.expert_bias_E.copy_(torch.tensor([0.0, 10.0]))  # everything is routed to expert 1
    x = torch.tensor([[1.0, 0, 0, 0]]).repeat(4, 1)  # p = (sigma, 1 - sigma) with sigma = e/(1+e)
    p0 = math.e / (1 + math.e)
    ctx = RoutingContext(group_size=4)
    # unbiased: all choose expert 0 -> f = (1, 0), loss = E * f0 * P0 = 2 * p0; routed: f = (0, 1) -> 2 * (1 - p0)
    torch.testing.assert_close(router(x, ctx).losses["balance"], torch.tensor(2 * p0))
    torch.testing.assert_close(routed(x, ctx).losses["balance"], torch.tensor(2 * (1 - p0)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_expert_groups": 3, "topk_expert_groups": 1}, "must divide num_experts=4"),
        ({"num_expert_groups": 2}, "go together"),
        ({"num_expert_groups": 2, "topk_expert_groups": 3}, "must be <= num_expert_groups"),
        ({"num_expert_groups": 4, "topk_expert_groups": 1}, "fewer than top_k=2"),
        ({"expert_capacity": 0}, "expert_capacity"),
        ({"renormalize_p": 0.0}, "renormalize_p"),
        ({"routed_scaling_factor": -1.0}, "routed_scaling_factor"),
        ({"balance_count": "all"}, "balance_count"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenChoiceRouter(dim=4, num_experts=4, top_k=2, **kwargs)


def test_expert_capacity_and_capacity_factor_exclude_each_other():
    with pytest.raises(ValueError, match="not both"):
        TokenChoiceRouter(dim=4, num_experts=4, top_k=2, capacity_factor=1.0, expert_capacity=3)


def test_weight_inputs_scales_the_expert_input_not_its_output():
    torch.manual_seed(0)
    layer = smoe.MoE(4, 5, 3, 1, router_kwargs={"score_fn": "sigmoid"}, weight_inputs=True).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y, aux = layer(x)
    plan = aux.plan
    want = torch.zeros_like(x)
    for n in range(plan.num_rows):  # y_t = f_e(w x_t): the weight goes in, the output comes out unscaled
        t, e, w = int(plan.token_idx_N[n]), int(plan.expert_idx_N[n]), plan.weight_N[n]
        want[t] += layer.experts.expert_forward(e, (w * x[t]).unsqueeze(0))[0]
    torch.testing.assert_close(y, want)
    plain = smoe.MoE(4, 5, 3, 1, router_kwargs={"score_fn": "sigmoid"}).double()
    plain.load_state_dict(layer.state_dict())
    assert not torch.allclose(plain(x)[0], y)  # SwiGLU is not linear: the two differ
    with pytest.raises(ValueError, match="weight_inputs"):
        smoe.MoE(4, 5, 3, 1, weight_inputs=1)
    with pytest.raises(ValueError, match="sparse plan"):
        smoe.MoE(4, 5, 3, 1, router="soft", weight_inputs=True)


def test_clamped_swiglu_formula():
    from smoe.experts.activations import clamped_swiglu

    # gate 10 -> clamped to 7: 7 * sigmoid(1.702 * 7); up -10 -> clamped to -7: (-7 + 1) = -6
    h1, h3 = torch.tensor([10.0, 0.0]), torch.tensor([-10.0, 2.0])
    want = torch.tensor([-6 * 7 / (1 + math.exp(-1.702 * 7)), 0.0])
    torch.testing.assert_close(clamped_swiglu(h1, h3), want)
    with pytest.raises(ValueError, match="limit"):
        smoe.MoE(4, 5, 3, 1, experts="clamped_swiglu", expert_kwargs={"limit": 0})
