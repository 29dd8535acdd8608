"""Attention (fused vs manual path), the shared block (attention probabilities and token ids reach the router),
MoE placement, and the trunk's aux collection."""

from __future__ import annotations

import pytest
import torch

from smoe.layers import MLP, MoE
from smoe.models import Block, MoEConfig, SelfAttention, Transformer, moe_layer_indices
from smoe.routing import Router, RouterOutput, RoutingContext, sparse_plan_from_topk


@pytest.mark.parametrize("causal", [True, False])
def test_manual_attention_matches_fused_outputs_and_gradients_float64(causal):
    torch.manual_seed(0)
    attn = SelfAttention(12, 3, causal=causal, bias=True, dtype=torch.float64)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    y_fused, none = attn(x)
    assert none is None
    g = torch.randn_like(y_fused)
    grads_fused = torch.autograd.grad(y_fused, [x, *attn.parameters()], g)
    y_manual, probs = attn(x, need_probs=True)
    grads_manual = torch.autograd.grad(y_manual, [x, *attn.parameters()], g)
    torch.testing.assert_close(y_manual, y_fused)
    for a, b in zip(grads_manual, grads_fused, strict=True):
        torch.testing.assert_close(a, b)
    assert probs.shape == (2, 3, 5, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))
    upper = torch.ones(5, 5, dtype=torch.bool).triu(1)
    if causal:
        assert (probs[..., upper] == 0).all()
    else:
        assert (probs[..., upper] > 0).all()


class _RecordingRouter(Router):
    """Sends every token to expert 0 with weight 1 and records the routing context it was given."""

    needs_attention_probs = True

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen: list[RoutingContext] = []

    def forward(self, x_TD, ctx):
        self.seen.append(ctx)
        T = x_TD.shape[0]
        idx = torch.zeros(T, 1, dtype=torch.long)
        plan = sparse_plan_from_topk(idx, torch.ones(T, 1, dtype=x_TD.dtype), self.num_experts)
        return RouterOutput(plan=plan, losses={}, loss=x_TD.new_zeros(()))


def test_block_hands_attention_probs_and_token_ids_to_the_router():
    torch.manual_seed(0)
    router = _RecordingRouter(dim=8, num_experts=2, top_k=1)
    moe = MoE(8, 16, 2, 1, router=router, causal=True)
    block = Block(attn=SelfAttention(8, 2, causal=True), ffn=moe, dim=8)
    assert block.needs_attn_probs
    x = torch.randn(3, 4, 8)
    ids = torch.randint(0, 100, (3, 4))
    out, aux = block(x, token_ids_BL=ids)
    assert out.shape == x.shape and aux is not None
    ctx = router.seen[-1]
    assert ctx.attn_probs.shape == (3, 2, 4, 4)
    assert (ctx.attn_probs.triu(1) == 0).all()  # causal attention: no weight on later tokens
    _, expected = block.attn(block.norm1(x), need_probs=True)
    torch.testing.assert_close(ctx.attn_probs, expected)
    assert torch.equal(ctx.token_ids_T, ids.reshape(-1))


def test_block_without_attention_aware_router_uses_the_fused_path():
    moe = MoE(8, 16, 2, 1)
    block = Block(attn=SelfAttention(8, 2, causal=True), ffn=moe, dim=8)
    assert not block.needs_attn_probs
    dense = Block(attn=SelfAttention(8, 2, causal=True), ffn=MLP(8, 16), dim=8)
    assert not dense.is_moe and not dense.needs_attn_probs
    _, aux = dense(torch.randn(1, 3, 8))
    assert aux is None


def test_plain_block_is_pre_norm_residual():
    torch.manual_seed(0)
    block = Block(attn=SelfAttention(8, 2, causal=False), ffn=MLP(8, 16), dim=8).eval()
    x = torch.randn(2, 3, 8)
    h = x + block.attn(block.norm1(x))[0]
    expected = h + block.ffn(block.norm2(h))
    torch.testing.assert_close(block(x)[0], expected)


@pytest.mark.parametrize(
    ("depth", "kwargs", "expected"),
    [
        (8, {"every": 2}, (1, 3, 5, 7)),  # V-MoE "Every 2": range(n-1, L, n) (reference §3.1.5)
        (8, {"every": 2, "last": 2}, (5, 7)),  # V-MoE "Last 2": the last two odd blocks
        (32, {"every": 2, "last": 5}, (23, 25, 27, 29, 31)),  # H/14 Last-5 example of the reference
        (12, {"every": 1, "last": 6}, (6, 7, 8, 9, 10, 11)),  # Soft MoE: last 6 consecutive blocks
        (4, {"every": 1}, (0, 1, 2, 3)),
        (4, {"every": 0}, ()),
        (4, {"layers": (2, 0)}, (0, 2)),
    ],
)
def test_moe_placement(depth, kwargs, expected):
    assert moe_layer_indices(depth, MoEConfig(**kwargs)) == expected


def test_trunk_collects_aux_in_depth_order():
    torch.manual_seed(0)
    blocks = []
    for i in range(3):
        ffn = MoE(8, 16, 2, 1) if i != 1 else MLP(8, 16)
        blocks.append(Block(attn=SelfAttention(8, 2, causal=False), ffn=ffn, dim=8))
    trunk = Transformer(blocks)
    x = torch.randn(2, 3, 8)
    _, auxes = trunk(x)
    assert len(auxes) == 2
    # each aux is the one its layer produced: re-run block 0 alone and compare its plan
    _, aux0 = blocks[0](x)
    assert torch.equal(auxes[0].plan.expert_idx_N, aux0.plan.expert_idx_N)
    assert trunk.moe_layers() == [blocks[0].ffn, blocks[2].ffn]
