"""Capacity, position-order dropping and V-MoE Batch Prioritized Routing."""

import pytest
import torch

import smoe
from smoe.routing.capacity import capacity_keep_mask, compute_capacity


def test_compute_capacity_formulas():
    # ceil(cf * S * K / E): ceil(1.0 * 10 * 2 / 4) = 5; vmoe rounds up to a multiple of 4 -> 8
    assert compute_capacity(10, 4, 1.0, 2) == 5
    assert compute_capacity(10, 4, 1.0, 2, multiple_of=4) == 8
    # 1.05 * 10 * 2 / 4 = 5.25 -> ceil 6, round 5
    assert compute_capacity(10, 4, 1.05, 2) == 6
    assert compute_capacity(10, 4, 1.05, 2, rounding="round") == 5
    assert compute_capacity(3, 64, 0.1, 1) == 1  # never below one slot
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="capacity_factor"):
            compute_capacity(10, 4, bad, 1)
    with pytest.raises(ValueError, match="rounding"):
        compute_capacity(10, 4, 1.0, 1, rounding="floor")


def test_position_order_keeps_earliest_tokens():
    expert = torch.zeros(1, 6, 1, dtype=torch.long)  # every token wants expert 0
    keep = capacity_keep_mask(expert, capacity=2, num_experts=2)
    assert keep.view(-1).tolist() == [True, True, False, False, False, False]


def test_bpr_drops_lowest_priority_first():
    expert = torch.zeros(1, 6, 1, dtype=torch.long)
    priority = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.5, 0.2]])
    keep = capacity_keep_mask(expert, capacity=2, num_experts=2, priority_GS=priority)
    assert keep.view(-1).tolist() == [False, True, False, True, False, False]  # tokens 1 (0.9) and 3 (0.8)
    keep3 = capacity_keep_mask(expert, capacity=3, num_experts=2, priority_GS=priority)
    assert keep3.view(-1).tolist() == [False, True, False, True, True, False]  # then token 4 (0.5)


def test_all_top1_choices_are_placed_before_any_top2_choice():
    # token 0 -> (0, 1), token 1 -> (1, 0), token 2 -> (1, 2); capacity 1 per expert
    # expert 0: token 0's top-1 (placed first) beats token 1's top-2 -> token 1's top-2 dropped
    # expert 1: token 1's top-1 is placed before token 2's top-1 and token 0's top-2
    # expert 2: only token 2's top-2 -> kept
    expert = torch.tensor([[[0, 1], [1, 0], [1, 2]]])
    keep = capacity_keep_mask(expert, capacity=1, num_experts=3)
    assert keep[0].tolist() == [[True, False], [True, False], [False, True]]


def test_groups_have_separate_buffers():
    expert = torch.zeros(2, 3, 1, dtype=torch.long)
    keep = capacity_keep_mask(expert, capacity=1, num_experts=1)
    assert keep.view(2, 3).tolist() == [[True, False, False], [True, False, False]]


def _router_layer(cf, batch_priority, E=4, K=1):
    return smoe.MoE(8, 16, E, K, capacity_factor=cf, router_kwargs={"batch_priority": batch_priority})


def test_bpr_with_capacity_below_one_keeps_highest_gate_tokens():
    layer = _router_layer(cf=0.5, batch_priority=True)
    layer.eval()
    x = torch.randn(64, 8)
    _, aux = layer(x)
    probs = torch.softmax(layer.router.gate(x).float(), -1)
    gate, choice = probs.max(-1)
    plan = aux.plan
    kept = torch.zeros(64, dtype=torch.bool)
    kept[plan.token_idx_N] = True
    assert aux.stats["drop_rate"].item() > 0
    for e in range(4):
        mine = choice == e
        if kept[mine].any() and (~kept[mine]).any():
            assert gate[mine & kept].min() >= gate[mine & ~kept].max()
    # capacity 0.5 * 64 / 4 = 8 per expert: at most 8 tokens each, fewer than half of all tokens processed
    assert all(c <= 8 for c in aux.stats["tokens_per_expert"].tolist())
    assert aux.stats["tokens_processed"].item() <= 32


def test_vanilla_capacity_keeps_earliest_positions():
    layer = _router_layer(cf=0.5, batch_priority=False)
    layer.eval()
    x = torch.randn(64, 8)
    _, aux = layer(x)
    choice = torch.softmax(layer.router.gate(x).float(), -1).argmax(-1)
    kept = torch.zeros(64, dtype=torch.bool)
    kept[aux.plan.token_idx_N] = True
    for e in range(4):
        positions = (choice == e).nonzero().squeeze(1)
        assert kept[positions].tolist() == [i < 8 for i in range(positions.numel())]


def test_bpr_needs_capacity():
    with pytest.raises(ValueError, match="capacity_factor"):
        smoe.MoE(8, 16, 4, 1, router_kwargs={"batch_priority": True})
