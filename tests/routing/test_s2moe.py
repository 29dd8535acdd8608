"""S2MoE: the noisy copy, its gate-mixed plan over 2T engine rows, the uncertainty loss, top-1 inference."""

import math

import pytest
import torch

import smoe
from smoe.routing.s2moe import gaussian_noise_copy, info_nce, s2moe_plan

F64 = torch.float64
D, E, K = 8, 4, 2


def pair(**s2moe_kwargs):
    """A token-choice layer (renormalised top-K) and an S2MoE layer with the same gate and experts."""
    tc = smoe.MoE(D, 16, E, K, router_kwargs={"renormalize": True, "balance_loss_weight": 0.0}, dtype=F64)
    s2 = smoe.MoE(D, 16, E, K, router="s2moe", router_kwargs={"balance_loss_weight": 0.0, **s2moe_kwargs}, dtype=F64)
    s2.load_state_dict(tc.state_dict(), strict=False)
    with torch.no_grad():
        s2.router.mix_gate.weight.normal_()  # a non-trivial gate g in (0, 1)
    return tc, s2


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_zero_noise_equals_plain_routing_on_output_and_input_gradient(backend):
    tc, s2 = pair(noise_scale=0.0, uncertainty_loss_weight=0.0)
    s2.backend = tc.backend = backend
    s2.train()
    x1 = torch.randn(2, 5, D, dtype=F64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y_tc, _ = tc(x1)
    y_s2, aux = s2(x2)
    assert aux.plan.num_rows == 2 * 10 * K  # the noisy copy is really routed
    torch.testing.assert_close(y_s2, y_tc)
    gy = torch.randn_like(y_tc)
    (y_tc * gy).sum().backward()
    (y_s2 * gy).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)  # with x~ = x the gate g cancels: dy/dg = f(x) - f(x~) = 0


def test_training_plan_reads_both_copies_with_gate_weights():
    _, s2 = pair()
    s2.train()
    router = s2.router
    T = 6
    x = torch.randn(T, D, dtype=F64)
    out = router(x, smoe.RoutingContext(group_size=T, batch_shape=(1, T)))
    plan = out.plan
    plan.validate()
    assert out.inputs_RD.shape == (2 * T, D)
    torch.testing.assert_close(out.inputs_RD[:T], x)
    assert not torch.allclose(out.inputs_RD[T:], x)  # the noisy copy differs
    assert plan.num_rows == 2 * T * K and plan.num_tokens == T
    assert torch.equal(plan.token_idx_N, plan.source_idx_N % T)
    g = torch.sigmoid(x.float() @ router.mix_gate.weight.float().t() + router.mix_gate.bias.float()).squeeze(1)
    clean = plan.source_idx_N < T
    torch.testing.assert_close(
        plan.weight_N[~clean].sum() + plan.weight_N[clean].sum(), torch.tensor(float(T))
    )  # renormalised weights: g * 1 + (1 - g) * 1 per token
    # each clean row carries g_t times the weight of its noisy twin's (1 - g_t)
    for t in range(T):
        wc = plan.weight_N[clean & (plan.token_idx_N == t)].sum()
        wn = plan.weight_N[~clean & (plan.token_idx_N == t)].sum()
        torch.testing.assert_close(wc, g[t])
        torch.testing.assert_close(wn, 1 - g[t])


def test_eval_plan_is_top1_without_noisy_rows():
    _, s2 = pair()
    s2.eval()
    T = 7
    x = torch.randn(T, D, dtype=F64)
    out = s2.router(x, smoe.RoutingContext(group_size=T, batch_shape=(1, T)))
    assert out.inputs_RD is None and out.plan.source_idx_N is None
    assert out.plan.num_rows == T and torch.equal(out.plan.token_idx_N.sort().values, torch.arange(T))
    torch.testing.assert_close(out.plan.weight_N, torch.ones(T))  # top-1, renormalised
    assert s2.router.experts_per_token() == 1
    s2.train()
    assert s2.router.experts_per_token() == 2 * K


def test_s2moe_plan_hand_worked():
    # T = 2, K = 1: token 0 -> expert 1 (w 1.0, g 0.25), token 1 -> expert 0 (w 0.5, g 1.0)
    plan = s2moe_plan(torch.tensor([[1], [0]]), torch.tensor([[1.0], [0.5]]), torch.tensor([0.25, 1.0]), 2)
    # rows sorted by expert: expert 0 <- sources 1 (clean, 0.5 * 1.0) and 3 (noisy, 0.5 * 0.0);
    # expert 1 <- sources 0 (clean, 1.0 * 0.25) and 2 (noisy, 1.0 * 0.75)
    assert plan.source_idx_N.tolist() == [1, 3, 0, 2]
    assert plan.token_idx_N.tolist() == [1, 1, 0, 0]
    assert plan.expert_idx_N.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(plan.weight_N, torch.tensor([0.5, 0.0, 0.25, 0.75]))


def test_noise_module_statistics():
    x = torch.randn(4000, 16) * 3 + 1
    assert torch.equal(gaussian_noise_copy(x, 4000, 0.0, "token"), x)
    # "token": one token repeated N times has one (mu, sigma); x~ - x = eps1 * x + eps2 has, per feature d,
    # mean mu and variance sigma^2 * (x_d^2 + 1)
    x0 = torch.tensor([0.0, 1.0, 2.0, 5.0])  # mu = 2, sigma^2 = (4 + 1 + 0 + 9) / 4 = 3.5
    noise = gaussian_noise_copy(x0.expand(20000, 4), 20000, 1.0, "token") - x0
    torch.testing.assert_close(noise.mean(0), torch.full((4,), 2.0), atol=0.15, rtol=0)
    torch.testing.assert_close(noise.var(0), 3.5 * (x0**2 + 1), rtol=0.05, atol=0)
    # "group": per-feature stats over the group; feature d has mean mu_d, so E[x~ - x] = mu_d
    xg = torch.randn(20000, 2) * torch.tensor([1.0, 2.0]) + torch.tensor([-1.0, 3.0])
    noise = gaussian_noise_copy(xg, 20000, 1.0, "group") - xg
    torch.testing.assert_close(noise.mean(0), torch.tensor([-1.0, 3.0]), atol=0.15, rtol=0)


def test_info_nce_hand_worked():
    # N = 2 orthonormal pairs, tau = 1: logits = I, loss = -log(e / (e + 1)) = log(1 + e^-1)
    a = torch.eye(2)
    assert info_nce(a, a, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_uncertainty_loss_in_training_only_and_subsampled():
    _, s2 = pair(uncertainty_loss_weight=0.1, nce_max_tokens=4)
    x = torch.randn(3, 5, D, dtype=F64)
    _, aux = s2.train()(x)
    assert "uncertainty" in aux.losses and float(aux.losses["uncertainty"]) > 0
    torch.testing.assert_close(aux.loss, 0.1 * aux.losses["uncertainty"])
    _, aux = s2.eval()(x)
    assert "uncertainty" not in aux.losses


def test_noise_stats_decide_coupling():
    assert not smoe.build_router("s2moe", dim=D, num_experts=E, top_k=K).couples_tokens
    assert smoe.build_router("s2moe", dim=D, num_experts=E, top_k=K, noise_stats="group").couples_tokens


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"noise_stats": "batch"}, "noise_stats"),
        ({"noise_scale": -1.0}, "noise_scale"),
        ({"eval_top_k": 9}, "eval_top_k"),
        ({"nce_max_tokens": 1}, "nce_max_tokens"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        smoe.MoE(D, 16, E, K, router="s2moe", router_kwargs=kwargs)
    with pytest.raises(ValueError, match="capacity_factor"):
        smoe.MoE(D, 16, E, K, router="s2moe", capacity_factor=1.0)
