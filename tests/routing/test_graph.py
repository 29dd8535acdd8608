"""Similarity-aware and attention-aware routing (Graph of Tokens)."""

import pytest
import torch

import smoe
from smoe.routing.graph import (
    AttentionAwareRouter,
    attention_matrix,
    from_sequence_order,
    positions_in_sequence,
    similarity_matrix,
    to_sequence_order,
)

F64 = torch.float64
B, L, D, E, K = 3, 5, 8, 4, 2


def causal_attention(Bx=B, Lx=L, H=2):
    scores = torch.randn(Bx, H, Lx, Lx, dtype=F64)
    return scores.masked_fill(torch.ones(Lx, Lx, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


def layers(router, group_mode="batch", **router_kwargs):
    """A token-choice layer (renormalised top-K, the graph routers' weighting) and a graph layer, same weights."""
    tc = smoe.MoE(D, 16, E, K, router="token_choice", router_kwargs={"renormalize": True}, dtype=F64)
    graph = smoe.MoE(D, 16, E, K, router=router, group_mode=group_mode, router_kwargs=router_kwargs, dtype=F64)
    graph.load_state_dict(tc.state_dict(), strict=False)
    return tc, graph


def test_similarity_matrix_is_row_stochastic_and_causal_mask_is_exact():
    feat = torch.randn(2, 6, 4)
    M = similarity_matrix(feat, temperature=0.5)
    assert bool((M >= 0).all())
    torch.testing.assert_close(M.sum(-1), torch.ones(2, 6))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 0, 1, 1, 2, 2]])  # "batch" and "position"-like orders
    Mc = similarity_matrix(feat, temperature=0.5, pos_GS=pos)
    torch.testing.assert_close(Mc.sum(-1), torch.ones(2, 6))
    later = pos.unsqueeze(1) > pos.unsqueeze(2)
    assert bool((Mc[later] == 0).all()) and bool((Mc[~later] > 0).all())


def test_attention_matrix_is_row_stochastic_head_average():
    A = causal_attention()
    M = attention_matrix(A * 0.9, (B, L))  # rows scaled as attention dropout would: renormalised
    torch.testing.assert_close(M.sum(-1), torch.ones(B, L))
    torch.testing.assert_close(M, A.mean(1).float())
    assert attention_matrix(A[:, 0], (B, L)).shape == (B, L, L)  # (B, L, L) is accepted too
    assert attention_matrix(A[0, 0], (1, L)).shape == (1, L, L)  # (L, L) for a 2-d layer input
    with pytest.raises(ValueError, match="attn_probs has shape"):
        attention_matrix(A, (B, L + 1))


@pytest.mark.parametrize("group_mode", ["batch", "sequence", "position"])
def test_sequence_order_round_trip_and_positions(group_mode):
    S = {"batch": B * L, "sequence": L, "position": B}[group_mode]
    ctx = smoe.RoutingContext(group_size=S, batch_shape=(B, L), group_mode=group_mode)
    v = torch.randn(B * L, E)
    torch.testing.assert_close(from_sequence_order(to_sequence_order(v, ctx), ctx), v)
    # the layer's grouping of a (B, L) index grid gives the routing order; positions must match
    grid = torch.arange(B * L).view(B, L, 1)
    routed = grid.transpose(0, 1).reshape(-1) if group_mode == "position" else grid.reshape(-1)
    assert torch.equal(to_sequence_order(routed.view(-1, 1), ctx).view(B, L), grid.view(B, L))
    assert torch.equal(positions_in_sequence(ctx, B * L), routed % L)


@pytest.mark.parametrize("group_mode", ["batch", "position"])
def test_identity_attention_reduces_to_token_choice(group_mode):
    tc, aa = layers("attention_aware", group_mode=group_mode)
    x = torch.randn(B, L, D, dtype=F64)
    eye = torch.eye(L, dtype=F64).expand(B, 2, L, L)
    torch.testing.assert_close(aa(x, attn_probs=eye)[0], tc(x)[0])
    # a real attention matrix changes the routing
    assert not torch.allclose(aa(x, attn_probs=causal_attention())[0], tc(x)[0])


def test_attention_mixing_matches_hand_computation_in_every_group_mode():
    x = torch.randn(B, L, D, dtype=F64)
    A = causal_attention()
    router = smoe.build_router("attention_aware", dim=D, num_experts=E, top_k=K, dtype=F64)
    p_BLE = torch.softmax(x.float() @ router.gate.weight.float().t(), -1)
    expected_BLE = A.mean(1).float() @ p_BLE  # p~_i = sum_j A[i, j] p_j within each sequence
    experts = smoe.SwiGLUExperts(D, 16, E, dtype=F64).state_dict()
    outputs = []
    for mode, S in (("batch", B * L), ("sequence", L), ("position", B)):
        # the router sees tokens in routing order: (L, B) in position mode, (B, L) otherwise
        x_TD = (x.transpose(0, 1) if mode == "position" else x).reshape(B * L, D)
        ctx = smoe.RoutingContext(group_size=S, attn_probs=A, batch_shape=(B, L), group_mode=mode)
        torch.testing.assert_close(to_sequence_order(router(x_TD, ctx).probs_TE, ctx), expected_BLE)
        layer = smoe.MoE(D, 16, E, K, router=router, group_mode=mode, dtype=F64)
        layer.experts.load_state_dict(experts)
        outputs.append(layer(x, attn_probs=A)[0])
    # dropless per-token selection: the group mode must not change the output
    torch.testing.assert_close(outputs[1], outputs[0])
    torch.testing.assert_close(outputs[2], outputs[0])


def test_attention_aware_needs_attention_probs():
    layer = smoe.MoE(D, 16, E, K, router="attention_aware")
    assert isinstance(layer.router, AttentionAwareRouter) and layer.router.needs_attention_probs
    with pytest.raises(ValueError, match="attn_probs"):
        layer(torch.randn(B, L, D))
    with pytest.raises(ValueError, match="attn_probs has shape"):
        layer(torch.randn(B, L, D), attn_probs=torch.rand(B, 2, L + 1, L + 1))


def test_similarity_self_weight_one_is_token_choice_and_zero_is_not():
    tc, sim = layers("similarity", self_weight=1.0)
    x = torch.randn(B, L, D, dtype=F64)
    torch.testing.assert_close(sim(x)[0], tc(x)[0])
    sim.router.self_weight = 0.0
    sim.router.temperature = 1.0  # a smooth graph: tokens borrow from their neighbours
    assert not torch.allclose(sim(x)[0], tc(x)[0])


def test_causal_similarity_sequence_graph_is_lower_triangular():
    router = smoe.build_router("similarity", dim=D, num_experts=E, top_k=K, causal=True)
    x = torch.randn(B * L, D)
    ctx = smoe.RoutingContext(group_size=L, batch_shape=(B, L), group_mode="sequence")
    M = router.mixing_matrix(x, ctx)
    assert M.shape == (B, L, L)
    lower = torch.ones(L, L, dtype=torch.bool).tril()
    assert bool((M[:, ~lower] == 0).all()) and bool((M[:, lower] > 0).all())
    torch.testing.assert_close(M.sum(-1), torch.ones(B, L))


def test_couples_tokens_follows_the_options():
    build = smoe.build_router
    assert build("similarity", dim=D, num_experts=E, top_k=K).couples_tokens
    assert not build("similarity", dim=D, num_experts=E, top_k=K, causal=True).couples_tokens
    assert build("similarity", dim=D, num_experts=E, top_k=K, causal=True, capacity_factor=1.0).couples_tokens
    assert not build("attention_aware", dim=D, num_experts=E, top_k=K).couples_tokens
    assert build("attention_aware", dim=D, num_experts=E, top_k=K, capacity_factor=1.0).couples_tokens


def test_learned_projection_and_logit_mixing_get_gradients():
    layer = smoe.MoE(D, 16, E, K, router="similarity", router_kwargs={"sim_dim": 4, "mix": "logits"}, dtype=F64)
    y, aux = layer(torch.randn(B, L, D, dtype=F64))
    (y.pow(2).sum() + aux.loss).backward()
    assert float(layer.router.sim_proj.weight.grad.abs().sum()) > 0
    assert float(layer.router.gate.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "router,kwargs,match",
    [
        ("similarity", {"temperature": 0.0}, "temperature"),
        ("similarity", {"sim_dim": 0}, "sim_dim"),
        ("similarity", {"self_weight": 2.0}, "self_weight"),
        ("attention_aware", {"mix": "both"}, "mix"),
    ],
)
def test_bad_options_raise(router, kwargs, match):
    with pytest.raises(ValueError, match=match):
        smoe.MoE(D, 16, E, K, router=router, router_kwargs=kwargs)
