"""MomentumSMoE / AdamSMoE / Robust MomentumSMoE (reference §7): hand-worked updates, the mu=0 special case, and
the wiring through the trunk (dense blocks pass the momentum through; robust lookahead on every FFN input)."""

from __future__ import annotations

import pytest
import torch

from smoe.models import Momentum, MomentumConfig, MomentumState, build_model, robust_momentum_coefficients


def t(v: float) -> torch.Tensor:
    return torch.tensor([v], dtype=torch.float64)


def test_heavy_ball_two_layer_hand_example():
    rule = Momentum(MomentumConfig(kind="heavy_ball", mu=0.5, gamma=2.0))
    state = MomentumState()
    # layer 1 (MoE): h=1, f=3:  m1 = 0.5*0 + 2*3 = 6;  x1 = h + m1 = 1 + 6 = 7
    x1 = rule.step(t(1.0), t(3.0), state, is_moe=True)
    assert x1.item() == 7.0 and state.m.item() == 6.0
    # a dense block in between: x = h + f = 2 + 5 = 7, and m stays 6
    assert rule.step(t(2.0), t(5.0), state, is_moe=False).item() == 7.0 and state.m.item() == 6.0
    # layer 2 (MoE): h=7.5, f=-1:  m2 = 0.5*6 + 2*(-1) = 1;  x2 = 7.5 + 1 = 8.5
    x2 = rule.step(t(7.5), t(-1.0), state, is_moe=True)
    assert x2.item() == 8.5 and state.m.item() == 1.0 and state.moe_index == 2


def test_adam_first_layer_then_heavy_ball_hand_example():
    rule = Momentum(MomentumConfig(kind="adam", mu=0.5, gamma=1.0, adam_gamma=1.0, beta1=0.9, beta2=0.99))
    state = MomentumState()
    # layer 1 (Adam): f=2:  p = 0.1*2 = 0.2;  v = 0.01*4 = 0.04;  x = h + 0.2/sqrt(0.04 + 1e-8) ~= h + 1.0
    #                       the heavy-ball state is still accumulated: m = 0.5*0 + 1*2 = 2
    x1 = rule.step(t(10.0), t(2.0), state, is_moe=True)
    assert x1.item() == pytest.approx(11.0, abs=1e-6)
    assert state.p.item() == pytest.approx(0.2) and state.v.item() == pytest.approx(0.04) and state.m.item() == 2.0
    # layer 2 (heavy ball; p, v untouched): f=4:  m = 0.5*2 + 4 = 5;  x = h + 5
    x2 = rule.step(t(10.0), t(4.0), state, is_moe=True)
    assert x2.item() == 15.0 and state.m.item() == 5.0 and state.p.item() == pytest.approx(0.2)


def test_robust_coefficients_and_hand_example():
    # rho=0.2, kappa=1.25, L=1 (reference §7.5): eps = 0.008 / (0.25*0.64*1.2) = 0.041667,
    # beta = 1.25*0.64*1.2 = 0.96, alpha = 1.25*0.008/0.25 = 0.04
    eps, beta, alpha = robust_momentum_coefficients(0.2, 1.25, 1.0)
    assert (eps, beta, alpha) == pytest.approx((0.0416667, 0.96, 0.04), rel=1e-5)
    rule = Momentum(MomentumConfig(kind="robust", rho=0.2, kappa=1.25))
    state = MomentumState()
    assert rule.lookahead(t(1.0), state).item() == 1.0  # no momentum yet
    # MoE layer 1: f=1:  m = 1 + 0.04*0 = 1;  x = h + 0.96*1
    assert rule.step(t(0.0), t(1.0), state, is_moe=True).item() == pytest.approx(0.96)
    # next FFN input: y + eps*beta*m = 1 + 0.0416667*0.96*1 = 1.04
    assert rule.lookahead(t(1.0), state).item() == pytest.approx(1.04)
    # MoE layer 2: f=2:  m = 2 + 0.04*1 = 2.04;  x = h + 0.96*2.04 = h + 1.9584
    assert rule.step(t(0.0), t(2.0), state, is_moe=True).item() == pytest.approx(1.9584)


@pytest.mark.parametrize("bad", [{"rho": 0.0}, {"kappa": 1.0}, {"lipschitz": 0.0}])
def test_robust_rejects_bad_coefficients(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        MomentumConfig(kind="robust", **bad)


@pytest.mark.parametrize("preset", ["lm_debug", "vit_debug"])
def test_heavy_ball_with_mu_0_gamma_1_equals_the_plain_model(preset):
    torch.manual_seed(0)
    plain = build_model(preset, **{"moe.every": 1}).eval()
    mom = build_model(preset, **{"moe.every": 1, "momentum.kind": "heavy_ball", "momentum.mu": 0.0}).eval()
    assert mom.trunk.momentum is not None
    mom.load_state_dict(plain.state_dict())
    x = torch.randint(0, 256, (2, 6)) if preset == "lm_debug" else torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(mom(x).logits, plain(x).logits, rtol=0, atol=0)
        # and momentum does change the model once mu > 0
        mom.trunk.momentum.config.mu = 0.7
        assert not torch.allclose(mom(x).logits, plain(x).logits)


def _manual_trunk(model, x, kind, mu=0.0, gamma=1.0):
    """The update rules restated block by block from the module pieces (reference §7.3-7.6, our sign)."""
    eps, beta, alpha = robust_momentum_coefficients(0.2, 1.25) if kind == "robust" else (0, 0, 0)
    m = torch.zeros_like(x)
    for block in model.trunk.blocks:
        h = x + block.attn(block.norm1(x))[0]
        y = block.norm2(h)
        if kind == "robust":
            y = y + eps * beta * m  # lookahead before every FFN, dense ones included
        if block.is_moe:
            f = block.ffn(y)[0]
            if kind == "robust":
                m = f + alpha * m
                x = h + beta * m
            else:
                m = mu * m + gamma * f
                x = h + m
        else:
            x = h + block.ffn(y)  # dense: plain residual, m unchanged
    return x


@pytest.mark.parametrize("kind", ["heavy_ball", "robust"])
def test_trunk_applies_the_rule_across_moe_and_dense_blocks(kind):
    torch.manual_seed(0)
    overrides = {"depth": 3, "moe.layers": (0, 2), "momentum.kind": kind, "momentum.mu": 0.5, "momentum.gamma": 1.5}
    model = build_model("lm_debug", **overrides).eval()
    x = torch.randn(2, 5, 16, dtype=torch.float32)
    with torch.no_grad():
        out, auxes = model.trunk(x)
        expected = _manual_trunk(model, x, kind, mu=0.5, gamma=1.5)
        torch.testing.assert_close(out, expected)
        assert len(auxes) == 2
        # the state is reset on every forward pass: a second call gives the same result
        torch.testing.assert_close(model.trunk(x)[0], out, rtol=0, atol=0)


def test_post_norm_adds_a_layernorm_per_block():
    model = build_model("lm_debug", **{"momentum.kind": "heavy_ball", "momentum.post_norm": True})
    assert all(isinstance(b.post_norm, torch.nn.LayerNorm) for b in model.trunk.blocks)
    plain = build_model("lm_debug", **{"momentum.post_norm": True})  # no momentum: no extra norm
    assert all(isinstance(b.post_norm, torch.nn.Identity) for b in plain.trunk.blocks)


def test_momentum_requires_a_kind():
    with pytest.raises(ValueError, match="momentum.kind"):
        Momentum(MomentumConfig(kind=None))
