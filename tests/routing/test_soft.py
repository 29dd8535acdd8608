"""Soft MoE (Puigcerver et al., ICLR 2024): the defining properties of the ``soft`` router.

The router contract (plan validity, engine agreement, gradients) and causal safety are checked for every router in
``test_contract.py`` and ``test_causal.py``; this file checks what makes the router *Soft MoE*.
"""

import math

import pytest
import torch

import smoe
from smoe.routing.soft import SoftMoERouter, l2_normalize, soft_moe_plan

F64 = torch.float64
D, F, E = 8, 16, 4


def make_layer(num_experts=E, top_k=1, **kw):
    return smoe.MoE(D, F, num_experts, top_k, router="soft", dtype=F64, **kw)


def record_slot_inputs(layer):
    """Make ``layer`` run the reference engine and record what each expert receives: ``{e: (G*C, D)}``."""
    layer.backend = "reference"
    seen = {}
    forward = layer.experts.expert_forward

    def recorder(e, x_MD):
        seen[e] = x_MD.detach().clone()
        return forward(e, x_MD)

    layer.experts.expert_forward = recorder  # instance attribute shadows the method
    return seen


def test_hand_worked_example():
    # 3 tokens, D = 2, E = 2 experts with C = 1 slot each; phi_0 = (1, 0), phi_1 = (0, 1), scale = ln 3, eps = 0.
    # x = (1, 0), (0, 2), (-3, 0) normalise to (1, 0), (0, 1), (-1, 0), so the logits (token x slot) are
    #   t1: [ ln3, 0 ]  -> exp [3,   1]
    #   t2: [ 0, ln3 ]  -> exp [1,   3]
    #   t3: [-ln3, 0 ]  -> exp [1/3, 1]
    # dispatch = softmax over TOKENS (columns): slot 0: [3, 1, 1/3] / (13/3) = [9/13, 3/13, 1/13]
    #                                          slot 1: [1, 3, 1] / 5 = [1/5, 3/5, 1/5]
    # combine = softmax over SLOTS (rows): t1 [3/4, 1/4], t2 [1/4, 3/4], t3 [1/3, 1] / (4/3) = [1/4, 3/4]
    x_GSD = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]], dtype=F64)
    phi_DEC = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64).view(2, 2, 1)
    plan = soft_moe_plan(x_GSD, phi_DEC, torch.tensor(math.log(3.0), dtype=F64), eps=0.0)
    dispatch = torch.tensor([[9 / 13, 1 / 5], [3 / 13, 3 / 5], [1 / 13, 1 / 5]], dtype=F64)
    combine = torch.tensor([[3 / 4, 1 / 4], [1 / 4, 3 / 4], [1 / 4, 3 / 4]], dtype=F64)
    torch.testing.assert_close(plan.dispatch_GSEC.view(3, 2), dispatch)
    torch.testing.assert_close(plan.combine_GSEC.view(3, 2), combine)

    # through the layer: the experts receive the RAW x mixed by the dispatch weights, not the normalised x:
    # slot 0 = 9/13 (1, 0) + 3/13 (0, 2) + 1/13 (-3, 0) = (6/13, 6/13); slot 1 = (1/5 - 3/5, 6/5) = (-2/5, 6/5)
    layer = smoe.MoE(2, 4, 2, 1, router="soft", group_mode="sequence", dtype=F64)
    with torch.no_grad():
        layer.router.slot_embed_DEC.copy_(phi_DEC)
        layer.router.scale.fill_(math.log(3.0))
    seen = record_slot_inputs(layer)
    y, aux = layer(x_GSD)
    tol = {"atol": 1e-5, "rtol": 0}  # the layer normalises with eps = 1e-6 inside the rsqrt
    torch.testing.assert_close(seen[0], torch.tensor([[6 / 13, 6 / 13]], dtype=F64), **tol)
    torch.testing.assert_close(seen[1], torch.tensor([[-2 / 5, 6 / 5]], dtype=F64), **tol)
    torch.testing.assert_close(aux.plan.dispatch_GSEC.view(3, 2), dispatch, **tol)
    # and every token's output is its combine mixture of the two slot outputs
    define = type(layer.experts).expert_forward  # the class's definition (the recorder shadows the instance's)
    out = torch.cat([define(layer.experts, e, seen[e]) for e in (0, 1)])  # (2 slots, D)
    torch.testing.assert_close(y[0], aux.plan.combine_GSEC.view(3, 2) @ out)
    torch.testing.assert_close(aux.plan.combine_GSEC.view(3, 2), combine, **tol)


@pytest.mark.parametrize("G,S,C", [(3, 5, 2), (2, 1, 3), (1, 7, 1)])
def test_dispatch_sums_to_one_over_tokens_and_combine_over_all_slots(G, S, C):
    # S != E*C, so a softmax on the wrong axis would not sum to one where it should
    plan = soft_moe_plan(torch.randn(G, S, D, dtype=F64), torch.randn(D, E, C, dtype=F64), torch.tensor(3.0, dtype=F64))
    plan.validate()
    assert plan.dispatch_GSEC.shape == plan.combine_GSEC.shape == (G, S, E, C)
    torch.testing.assert_close(plan.dispatch_GSEC.sum(dim=1), torch.ones(G, E, C, dtype=F64))
    torch.testing.assert_close(plan.combine_GSEC.sum(dim=(2, 3)), torch.ones(G, S, dtype=F64))
    assert bool((plan.dispatch_GSEC > 0).all()) and bool((plan.combine_GSEC > 0).all())  # soft: nothing is dropped
    if S == 1:  # a softmax over a single token: each slot is that token
        torch.testing.assert_close(plan.dispatch_GSEC, torch.ones(G, 1, E, C, dtype=F64))


def test_combine_is_joint_over_experts_and_slots_not_per_expert():
    # with C = 2 slots per expert, a per-expert softmax over C would sum to E per token, not 1
    layer = make_layer(router_kwargs={"num_slots": 2})
    _, aux = layer(torch.randn(2, 5, D, dtype=F64))
    assert aux.plan.combine_GSEC.shape == (1, 10, E, 2)
    torch.testing.assert_close(aux.plan.combine_GSEC.sum(dim=(2, 3)), torch.ones(1, 10, dtype=F64))
    assert not torch.allclose(aux.plan.combine_GSEC.sum(dim=3), torch.ones(1, 10, E, dtype=F64))


def test_raw_x_is_mixed_and_the_weights_ignore_its_norm():
    # scaling every token by a > 0 leaves the normalised logits, hence both weight tensors, unchanged, and scales
    # every slot input by a (the raw x is mixed; mixing the normalised x would leave the slot inputs unchanged)
    layer = make_layer(router_kwargs={"num_slots": 2}, group_mode="sequence")
    seen = record_slot_inputs(layer)
    x = torch.randn(3, 5, D, dtype=F64)
    _, aux1 = layer(x)
    slots1 = {e: s.clone() for e, s in seen.items()}
    _, aux2 = layer(3.0 * x)
    torch.testing.assert_close(aux2.plan.dispatch_GSEC, aux1.plan.dispatch_GSEC)
    torch.testing.assert_close(aux2.plan.combine_GSEC, aux1.plan.combine_GSEC)
    for e in range(E):
        torch.testing.assert_close(seen[e], 3.0 * slots1[e])
    # and the slot inputs are exactly dispatch^T x on the raw tokens
    slots_EGCD = torch.einsum("gsec,gsd->egcd", aux1.plan.dispatch_GSEC, x)
    for e in range(E):
        torch.testing.assert_close(slots1[e], slots_EGCD[e].reshape(-1, D))


def test_slot_vectors_are_normalised_and_scale_is_the_temperature():
    x_GSD, phi_DEC = torch.randn(2, 6, D, dtype=F64), torch.randn(D, E, 2, dtype=F64)
    one = torch.tensor(1.0, dtype=F64)
    base = soft_moe_plan(x_GSD, phi_DEC, one, eps=0.0)
    # scaling a slot vector by any positive constant changes nothing: only its direction counts (eps = 0: exact)
    scaled = soft_moe_plan(x_GSD, phi_DEC * torch.tensor([0.1, 10.0], dtype=F64), one, eps=0.0)
    torch.testing.assert_close(scaled.dispatch_GSEC, base.dispatch_GSEC)
    torch.testing.assert_close(scaled.combine_GSEC, base.combine_GSEC)
    # scale multiplies the logits: scale = 2 equals squaring the unnormalised softmax terms
    two = soft_moe_plan(x_GSD, phi_DEC, 2 * one, eps=0.0)
    sq = base.dispatch_GSEC.square()
    torch.testing.assert_close(two.dispatch_GSEC, sq / sq.sum(dim=1, keepdim=True))
    # scale = 0 is the paper's "Uniform" ablation (Table 2): dispatch 1/S per token, combine 1/(E*C) per slot
    uniform = soft_moe_plan(x_GSD, phi_DEC, 0 * one, eps=0.0)
    torch.testing.assert_close(uniform.dispatch_GSEC, torch.full_like(uniform.dispatch_GSEC, 1 / 6))
    torch.testing.assert_close(uniform.combine_GSEC, torch.full_like(uniform.combine_GSEC, 1 / (E * 2)))
    # the normalisation itself
    v = torch.tensor([[3.0, 4.0]], dtype=F64)
    torch.testing.assert_close(l2_normalize(v, dim=-1, eps=0.0), torch.tensor([[0.6, 0.8]], dtype=F64))


def test_one_token_per_group_and_one_expert_is_the_dense_expert():
    # S = 1: the one slot is the token itself; E = C = 1: the token takes all of that slot's output: y = f_0(x)
    layer = make_layer(num_experts=1, group_mode="position")  # groups = the B tokens at one position
    x = torch.randn(1, 5, D, dtype=F64)
    y, aux = layer(x)
    assert aux.plan.dispatch_GSEC.shape == (5, 1, 1, 1)
    torch.testing.assert_close(y[0], layer.experts.expert_forward(0, x[0]))


def test_one_expert_one_slot_gives_every_token_of_a_group_the_same_output():
    # E = C = 1: the combine softmax has one entry, so every token gets f(sum_s D_s x_s), the group's one slot
    layer = make_layer(num_experts=1, group_mode="sequence")
    x = torch.randn(2, 5, D, dtype=F64)
    y, _ = layer(x)
    for b in range(2):
        torch.testing.assert_close(y[b], y[b, :1].expand(5, D))
    assert not torch.allclose(y[0, 0], y[1, 0])  # but groups (images) differ


def test_group_smaller_than_the_number_of_slots():
    # S = 2 tokens per group, E*C = 12 slots: every slot is still a convex mixture of the 2 tokens
    layer = make_layer(router_kwargs={"num_slots": 3}, group_mode="position")
    x = torch.randn(2, 4, D, dtype=F64)
    y, aux = layer(x)
    assert aux.plan.dispatch_GSEC.shape == (4, 2, E, 3) and bool(torch.isfinite(y).all())
    torch.testing.assert_close(aux.plan.dispatch_GSEC.sum(dim=1), torch.ones(4, E, 3, dtype=F64))


def test_per_sequence_determinism_in_sequence_mode():
    # one group per image/sequence: changing sequence 1 must not change sequence 0's output ...
    layer = make_layer(group_mode="sequence").eval()
    x1 = torch.randn(2, 6, D, dtype=F64)
    x2 = x1.clone()
    x2[1] = torch.randn(6, D, dtype=F64)
    y1, _ = layer(x1)
    y2, _ = layer(x2)
    torch.testing.assert_close(y2[0], y1[0], atol=0, rtol=0)
    assert not torch.allclose(y2[1], y1[1])
    # ... and the check has teeth: with one group for the whole batch, sequence 0 does change
    batch = make_layer(group_mode="batch").eval()
    batch.load_state_dict(layer.state_dict())
    assert not torch.allclose(batch(x1)[0][0], batch(x2)[0][0])


def test_probs_are_the_combine_weights_per_expert_and_there_is_no_aux_loss():
    layer = make_layer(router_kwargs={"num_slots": 2})
    x = torch.randn(2, 5, D, dtype=F64)
    y, aux = layer(x)
    out = layer.router(x.reshape(10, D), smoe.RoutingContext(group_size=10))
    torch.testing.assert_close(out.probs_TE, out.plan.combine_GSEC.sum(dim=-1).reshape(10, E))
    torch.testing.assert_close(out.probs_TE.sum(dim=-1), torch.ones(10, dtype=F64))
    assert float(aux.loss) == 0.0 and aux.losses == {}
    assert 0 < float(aux.stats["router_entropy"]) <= math.log(E) + 1e-9
    assert aux.stats["tokens_per_expert"].tolist() == [2] * E  # G * C slots per expert
    assert float(aux.stats["drop_rate"]) == 0.0


def test_gradients_reach_slot_vectors_scale_and_input():
    torch.manual_seed(1)
    x_GSD = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    phi_DEC = torch.randn(4, 2, 2, dtype=F64, requires_grad=True)
    scale = torch.tensor(1.5, dtype=F64, requires_grad=True)

    def weights(x, phi, s):
        plan = soft_moe_plan(x, phi, s)
        return plan.dispatch_GSEC, plan.combine_GSEC

    assert torch.autograd.gradcheck(weights, (x_GSD, phi_DEC, scale))
    # through the layer: the task loss reaches both router parameters
    layer = make_layer(router_kwargs={"num_slots": 2})
    y, _ = layer(torch.randn(2, 5, D, dtype=F64))
    (y * torch.randn_like(y)).sum().backward()
    for name in ("slot_embed_DEC", "scale"):
        grad = getattr(layer.router, name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


def test_slot_count_rules():
    def router(**kw):
        return SoftMoERouter(dim=D, num_experts=E, top_k=2, dtype=F64, **kw)

    assert router().num_slots == 1  # the paper's long runs: one slot per expert
    assert router(num_slots=3).slot_embed_DEC.shape == (D, E, 3)
    # vmoe: round(cf * S / E), at least 1
    assert router(capacity_factor=2.0, tokens_per_group=12).num_slots == 6
    assert router(capacity_factor=1.0, tokens_per_group=10).num_slots == 2  # round(2.5) = 2 (Python round)
    assert router(capacity_factor=0.1, tokens_per_group=12).num_slots == 1  # round(0.3) = 0, clamped
    assert router(capacity_factor=2.0, tokens_per_group=12).experts_per_token() == E * 6 / 12
    assert router(num_slots=2).experts_per_token() == 2  # unknown S: accounting falls back to top_k
    assert router(num_slots=2).experts_per_token(10) == E * 2 / 10  # S known from the layer's shapes
    assert router().slot_embed_DEC.dtype == F64 and router().scale.shape == ()
    assert router().scale.item() == 1.0


def test_slot_vector_init_is_jax_lecun_normal():
    # JAX lecun_normal on a (D, E, C) kernel: fan_in = E * D, truncated normal at 2 std, overall std 1/sqrt(E*D)
    r = SoftMoERouter(dim=64, num_experts=32, top_k=1, num_slots=8, dtype=F64)
    w = r.slot_embed_DEC.detach()
    assert abs(float(w.std()) * math.sqrt(32 * 64) - 1.0) < 0.05
    assert float(w.abs().max()) <= 2 / math.sqrt(32 * 64) / 0.87962566103423978 + 1e-12


def test_noise_only_in_training():
    layer = make_layer(router_kwargs={"noise_std": 1.0})
    x = torch.randn(2, 5, D, dtype=F64)
    layer.train()
    torch.manual_seed(0)
    _, a = layer(x)
    torch.manual_seed(1)
    _, b = layer(x)
    assert not torch.allclose(a.plan.dispatch_GSEC, b.plan.dispatch_GSEC)
    torch.testing.assert_close(a.plan.combine_GSEC.sum(dim=(2, 3)), torch.ones(1, 10, dtype=F64))
    layer.eval()
    quiet = make_layer()
    quiet.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x)[1].plan.dispatch_GSEC, quiet.eval()(x)[1].plan.dispatch_GSEC)


def test_router_math_in_float32_under_autocast():
    layer = smoe.MoE(D, F, E, 1, router="soft")
    x = torch.randn(2, 5, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
    assert aux.plan.dispatch_GSEC.dtype == torch.float32 and bool(torch.isfinite(y).all())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_slots": 0}, "num_slots.*0"),
        ({"num_slots": 1.5}, "num_slots.*1.5"),
        ({"num_slots": True}, "num_slots.*True"),
        ({"noise_std": -0.5}, "noise_std.*-0.5"),
        ({"tokens_per_group": 0, "capacity_factor": 1.0}, "tokens_per_group.*0"),
        ({"num_slots": 2, "capacity_factor": 1.5}, r"num_slots \(2\).*capacity_factor \(1.5\)"),
        ({"capacity_factor": 1.25}, "capacity_factor=1.25.*tokens_per_group"),
        ({"tokens_per_group": 196}, "tokens_per_group=196"),
        ({"capacity_factor": -1.0, "tokens_per_group": 8}, "capacity_factor.*-1.0"),
    ],
)
def test_bad_options_raise_value_error_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoftMoERouter(dim=D, num_experts=E, top_k=1, **kwargs)


def test_layer_passes_capacity_factor_and_rejects_it_with_num_slots():
    layer = make_layer(capacity_factor=2.0, router_kwargs={"tokens_per_group": 6}, group_mode="sequence")
    _, aux = layer(torch.randn(2, 6, D, dtype=F64))
    assert aux.plan.dispatch_GSEC.shape == (2, 6, E, 3)  # round(2 * 6 / 4) = 3
    with pytest.raises(ValueError, match="num_slots"):
        make_layer(capacity_factor=2.0, router_kwargs={"num_slots": 2})
    # the slot count is a parameter shape: the evaluation capacity cannot change it
    assert layer.router.capacity_options == frozenset() and layer.capacity_factor is None
    with pytest.raises(ValueError, match="no capacity_factor"):
        layer.set_eval_capacity(1.0)
