"""Auxiliary losses on small hand-worked inputs (the arithmetic is in the comments)."""

import math

import pytest
import torch

from smoe.routing.losses import importance_loss, load_loss, router_z_loss, switch_balance_loss

# 4 tokens, 2 experts
PROBS = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]]])  # (G=1, S=4, E=2)


def test_switch_balance_loss_top1():
    top1 = PROBS.argmax(-1, keepdim=True)  # choices [0, 0, 1, 0]
    # f = [3/4, 1/4]; P = mean probs = [2.6/4, 1.4/4] = [0.65, 0.35]
    # L = E * sum f_i P_i = 2 * (0.75*0.65 + 0.25*0.35) = 2 * 0.575 = 1.15
    assert switch_balance_loss(PROBS, top1).item() == pytest.approx(1.15)


def test_switch_balance_loss_is_one_when_uniform_for_any_k():
    # every token picks both experts: f = [1/2, 1/2], L = 2 * (0.5*0.65 + 0.5*0.35) = 1.0
    both = torch.tensor([[[0, 1]] * 4])
    assert switch_balance_loss(PROBS, both).item() == pytest.approx(1.0)
    uniform = torch.full((1, 6, 3), 1 / 3)
    choice = torch.tensor([[[0], [1], [2], [0], [1], [2]]])
    assert switch_balance_loss(uniform, choice).item() == pytest.approx(1.0)


def test_switch_balance_loss_averages_groups():
    # group 0 as above (1.15); group 1 is uniform and balanced (1.0) -> mean 1.075
    probs = torch.cat([PROBS, torch.full((1, 4, 2), 0.5)])
    choice = torch.cat([PROBS.argmax(-1, keepdim=True), torch.tensor([[[0], [1], [0], [1]]])])
    assert switch_balance_loss(probs, choice).item() == pytest.approx(1.075)


def test_router_z_loss():
    # logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4; mean of squares = (0.480453 + 1.921812) / 2
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    assert router_z_loss(logits).item() == pytest.approx(1.2011325, rel=1e-6)


def test_importance_loss_uses_population_std():
    # Imp = column sums = [2.6, 1.4]; mean 2.0; population variance ((0.6)^2 + (0.6)^2) / 2 = 0.36
    # CV^2 = 0.36 / 2.0^2 = 0.09 (with the sample std it would be 0.18)
    assert importance_loss(PROBS).item() == pytest.approx(0.09)


def test_load_loss_vmoe():
    # one token, E=2, k=1, sigma=1: clean logits [1, 0], noisy [1.5, 0.2] -> threshold (1st largest noisy) = 1.5
    # z = (1.5 - [1, 0]) / 1 = [0.5, 1.5]; p = 1 - Phi(z) = [0.3085375, 0.0668072]
    # mean 0.1876724; population variance 0.0146084; CV^2 = 0.0146084 / 0.1876724^2 = 0.4147646
    logits = torch.tensor([[[1.0, 0.0]]])
    noisy = torch.tensor([[[1.5, 0.2]]])
    assert load_loss(logits, noisy, 1.0, 1).item() == pytest.approx(0.4147646, rel=1e-5)
    with pytest.raises(ValueError, match="noise_std"):
        load_loss(logits, noisy, 0.0, 1)


def test_balance_loss_gradient_flows_through_probabilities_only():
    logits = torch.randn(1, 8, 4, requires_grad=True)
    probs = logits.softmax(-1)
    loss = switch_balance_loss(probs, probs.topk(2, -1).indices)
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_switch_balance_loss_global_scope_pools_the_groups():
    # two groups of two tokens, E = 2, K = 1. Group 0 sends both tokens to expert 0, group 1 both to expert 1.
    probs = torch.tensor([[[0.9, 0.1], [0.7, 0.3]], [[0.2, 0.8], [0.4, 0.6]]])
    idx = torch.tensor([[[0], [0]], [[1], [1]]])
    # per group: f = (1, 0), P = (0.8, 0.2) -> 2 * 0.8 = 1.6; f = (0, 1), P = (0.3, 0.7) -> 2 * 0.7 = 1.4; mean 1.5
    assert switch_balance_loss(probs, idx).item() == pytest.approx(1.5)
    # pooled (no process group here): f = (0.5, 0.5), P = (0.55, 0.45) -> 2 * (0.275 + 0.225) = 1.0
    assert switch_balance_loss(probs, idx, scope="global").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="scope"):
        switch_balance_loss(probs, idx, scope="world")
