"""Invariants of the MoE layer that must hold whatever the engine."""

import pytest
import torch

import smoe
from smoe.experts import MLP

F64 = torch.float64


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", smoe.list_experts())
@pytest.mark.parametrize("backend", ["reference", "fast", "unfused"])
def test_one_expert_top1_equals_dense_mlp(activation, bias, backend):
    # softmax over a single logit is exactly 1, so the MoE is the expert itself: every expert type, with and without
    # biases, computes what the dense MLP of the same activation computes
    layer = smoe.MoE(8, 16, 1, 1, expert=activation, expert_bias=bias, dtype=F64, backend=backend)
    mlp = MLP(8, 16, activation=activation, bias=bias, dtype=F64)
    ex = layer.experts
    with torch.no_grad():
        for b in (ex.b1_EF, ex.b3_EF, ex.b2_ED):
            if b is not None:
                b.normal_()
        for lin, w, b in ((mlp.w1, ex.w1_EFD, ex.b1_EF), (mlp.w3, ex.w3_EFD, ex.b3_EF), (mlp.w2, ex.w2_EDF, ex.b2_ED)):
            assert (lin is None) == (w is None)
            if lin is not None:
                lin.weight.copy_(w[0])
                if b is not None:
                    lin.bias.copy_(b[0])
    x = torch.randn(3, 5, 8, dtype=F64)
    y, aux = layer(x)
    torch.testing.assert_close(y, mlp(x))


@pytest.mark.parametrize("batch_priority", [False, True])
def test_large_capacity_equals_dropless(batch_priority):
    E, K = 4, 2
    dropless = smoe.MoE(8, 16, E, K, dtype=F64)
    capped = smoe.MoE(
        8,
        16,
        E,
        K,
        capacity_factor=float(E),
        dtype=F64,  # C = S*K: room for every assignment
        router_kwargs={"batch_priority": batch_priority},
    )
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(2, 9, 8, dtype=F64)
    y0, aux0 = dropless(x)
    y1, aux1 = capped(x)
    torch.testing.assert_close(y1, y0)
    assert aux1.stats["drop_rate"].item() == 0.0


@pytest.mark.parametrize("cf,S,E", [(1.0, 12, 4), (2.0, 12, 4), (0.5, 16, 8), (3.0, 5, 2)])
def test_expert_choice_gives_each_expert_exactly_c_tokens(cf, S, E):
    layer = smoe.MoE(8, 16, E, 1, router="expert_choice", capacity_factor=cf, group_mode="sequence", dtype=F64)
    B = 3
    _, aux = layer(torch.randn(B, S, 8, dtype=F64))
    c = min(smoe.routing.compute_capacity(S, E, cf, 1), S)
    assert aux.stats["tokens_per_expert"].tolist() == [B * c] * E
    plan = aux.plan
    # within each (expert, sequence) the c tokens are distinct and belong to that sequence
    for e in range(E):
        rows = plan.token_idx_N[plan.expert_idx_N == e].view(B, c)
        for b in range(B):
            assert rows[b].unique().numel() == c
            assert bool(((rows[b] // S) == b).all())


def test_moe_accepts_2d_and_3d_and_group_modes_agree_when_dropless():
    layer = smoe.MoE(8, 16, 4, 2, dtype=F64)
    x = torch.randn(2, 6, 8, dtype=F64)
    y3, _ = layer(x)
    y2, _ = layer(x.reshape(12, 8))
    torch.testing.assert_close(y3.reshape(12, 8), y2)
    for mode in ("sequence", "position"):
        layer.group_mode = mode
        torch.testing.assert_close(layer(x)[0], y3)


def test_position_group_mode_is_causal_for_expert_choice():
    layer = smoe.MoE(
        8, 16, 4, 1, router="expert_choice", capacity_factor=1.0, group_mode="position", causal=True, dtype=F64
    )
    x = torch.randn(3, 7, 8, dtype=F64)
    y, _ = layer(x)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(3, 3, 8, dtype=F64)  # change every token after position 3
    y2, _ = layer(x2)
    torch.testing.assert_close(y2[:, :4], y[:, :4])
    assert not torch.allclose(y2[:, 4:], y[:, 4:])


def test_causal_layer_refuses_leaking_router_unless_opted_in():
    with pytest.raises(ValueError, match="expert_choice"):
        smoe.MoE(8, 16, 4, 1, router="expert_choice", causal=True)
    with pytest.raises(ValueError, match="allow_token_coupling"):
        smoe.MoE(8, 16, 4, 2, capacity_factor=1.0, causal=True)
    smoe.MoE(8, 16, 4, 1, router="expert_choice", causal=True, allow_token_coupling=True)
    smoe.MoE(8, 16, 4, 2, causal=True)  # dropless token choice does not couple tokens


def test_aux_outputs_are_values_not_globals():
    layer = smoe.MoE(8, 16, 4, 2, router_kwargs={"z_loss_weight": 1e-3})
    _, aux1 = layer(torch.randn(10, 8))
    _, aux2 = layer(torch.randn(10, 8))
    assert set(aux1.losses) == {"balance", "z"}
    assert aux1.loss.dim() == 0 and aux1.loss.requires_grad
    expected = 0.01 * aux1.losses["balance"] + 1e-3 * aux1.losses["z"]
    torch.testing.assert_close(aux1.loss, expected)
    assert aux1.loss is not aux2.loss
    ent = aux1.stats["router_entropy"].item()
    assert 0.0 < ent <= torch.log(torch.tensor(4.0)).item() + 1e-6


def test_zero_aux_loss_when_none_applies():
    layer = smoe.MoE(8, 16, 4, 2, router_kwargs={"balance_loss_weight": 0.0})
    _, aux = layer(torch.randn(5, 8))
    assert aux.loss.item() == 0.0 and aux.losses == {}


def test_router_math_is_float32_under_autocast_and_weights_cast_back():
    layer = smoe.MoE(16, 32, 4, 2)
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer.router(x.reshape(16, 16), smoe.RoutingContext(group_size=16))
        y, _ = layer(x)
    assert out.probs_TE.dtype == torch.float32 and out.plan.weight_N.dtype == torch.float32
    assert y.dtype == torch.bfloat16


def test_noise_only_in_training_and_eval_is_deterministic():
    layer = smoe.MoE(
        8, 16, 4, 2, router_kwargs={"noise": "gaussian", "importance_loss_weight": 0.005, "load_loss_weight": 0.005}
    )
    x = torch.randn(12, 8)
    layer.train()
    _, aux = layer(x)
    assert {"importance", "load"} <= set(aux.losses)
    layer.eval()
    y1, aux1 = layer(x)
    y2, _ = layer(x)
    torch.testing.assert_close(y1, y2)
    assert "load" not in aux1.losses  # the load loss needs noise (vmoe omits it without)


def test_aux_loss_free_bias_shifts_selection_only_and_updates_outside_forward():
    layer = smoe.MoE(8, 16, 4, 1, router_kwargs={"expert_bias": True, "balance_loss_weight": 0.0})
    router = layer.router
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0] = 1.0  # every (positive) token prefers expert 0
    x = torch.rand(16, 8) + 0.1
    layer.train()
    _, aux = layer(x)
    assert aux.stats["tokens_per_expert"].tolist() == [16, 0, 0, 0]
    assert router.tokens_per_expert_E.tolist() == [16, 0, 0, 0]
    assert router.expert_bias_E.abs().sum() == 0  # forward never touches the bias
    n = smoe.update_expert_bias(layer, rate=0.5)
    assert n == 1
    # b_i += rate * sign(mean_load - load_i): mean load 4 -> expert 0 down, the others up
    assert router.expert_bias_E.tolist() == [-0.5, 0.5, 0.5, 0.5]
    assert router.tokens_per_expert_E.sum() == 0
    # a large enough bias moves selection away from expert 0; combine weights stay the unbiased softmax
    with torch.no_grad():
        router.expert_bias_E.copy_(torch.tensor([-10.0, 10.0, 0.0, 0.0]))
    layer.eval()
    _, aux = layer(x)
    assert aux.stats["tokens_per_expert"].tolist() == [0, 16, 0, 0]
    probs = torch.softmax(router.gate(x).float(), -1)[:, 1]
    torch.testing.assert_close(aux.plan.weight_N, probs)
    assert "router.expert_bias_E" in layer.state_dict() and "router.tokens_per_expert_E" not in layer.state_dict()


def test_bias_update_hook_runs_before_optimizer_step():
    layer = smoe.MoE(8, 16, 4, 1, router_kwargs={"expert_bias": True})
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    handle = smoe.register_bias_update_hook(opt, layer, rate=0.1)
    y, aux = layer(torch.randn(16, 8))
    (y.sum() + aux.loss).backward()
    assert layer.router.tokens_per_expert_E.sum() == 16
    opt.step()
    assert layer.router.tokens_per_expert_E.sum() == 0
    assert layer.router.expert_bias_E.abs().sum() > 0
    handle.remove()
