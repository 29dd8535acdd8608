"""Parameter / FLOP accounting: a hand count, and FlopCounterMode measurements of real forward passes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import smoe
from smoe.models import LMConfig, MoEConfig, build_model
from smoe.models.accounting import experts_per_token


def _hand_lm() -> LMConfig:
    return LMConfig(
        vocab_size=10,
        seq_len=5,
        dim=4,
        depth=2,
        num_heads=2,
        mlp_hidden_dim=6,
        moe=MoEConfig(num_experts=3, top_k=2, hidden_dim=6, every=2),
    )


def test_lm_accounting_matches_a_hand_count():
    acc = build_model(_hand_lm()).accounting()
    # parameters (no biases; LayerNorms have a weight only):
    #   token embedding 10*4 = 40 (the tied head adds nothing), positions 5*4 = 20
    #   block 0: norm1 4 + attention (qkv 4*12 = 48, proj 4*4 = 16) 64 + norm2 4 + SwiGLU MLP 3*4*6 = 72 -> 144
    #   block 1: norm1 4 + attention 64 + norm2 4 + gate 3*4 = 12 + 3 experts * 72 = 216 -> 300
    #   final norm 4;  total 40 + 20 + 144 + 300 + 4 = 508
    assert acc["num_parameters"] == 508
    # active: a token uses 2 of the 3 experts: 508 - 216 * (1 - 2/3) = 508 - 72 = 436
    assert acc["num_active_parameters"] == 436
    # FLOPs per token = 2 * matmul weights + attention over the context (4 * seq_len * dim per layer):
    #   weights: attention 64 * 2 layers = 128, MLP 72, gate 12, 2 experts * 72 = 144, head 40  -> 396 -> 792
    #   attention scores and values: 4 * 5 * 4 = 80 per layer, 2 layers -> 160;  total 952
    assert acc["flops_per_token"] == 952
    assert acc["tokens_per_sample"] == 5 and acc["flops_per_sample"] == 952 * 5
    model = build_model(_hand_lm())
    assert (model.num_parameters(), model.num_active_parameters(), model.flops_per_token()) == (508, 436, 952)


def _measured_flops(model, *inputs) -> int:
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = False  # manual attention: its matmuls are visible to the counter
    with smoe.use_backend("reference"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"moe.every": 1, "moe.shared_expert_hidden_dim": 8}, {"mlp_activation": "gelu", "bias": True}],
    ids=["default", "shared_expert", "gelu_bias"],
)
def test_lm_flops_match_flop_counter(overrides):
    torch.manual_seed(0)
    model = build_model("lm_debug", **overrides).eval()  # dropless top-2: exactly 2 expert rows per token
    B, L = 2, model.config.seq_len
    measured = _measured_flops(model, torch.randint(0, 256, (B, L)))
    assert measured == model.flops_per_token() * B * L


def test_vit_flops_match_flop_counter():
    torch.manual_seed(0)
    model = build_model("vit_debug", **{"moe.capacity_factor": None, "moe.every": 1}).eval()
    B = 2
    measured = _measured_flops(model, torch.randn(B, 1, 28, 28))
    acc = model.accounting()
    assert measured == pytest.approx(acc["flops_per_sample"] * B, rel=1e-12)
    assert acc["tokens_per_sample"] == 17


def test_expert_choice_uses_the_capacity_factor_as_experts_per_token():
    model = build_model(
        "lm_debug", **{"moe.router": "expert_choice", "moe.capacity_factor": 1.0, "moe.group_mode": "position"}
    )
    dense_part = build_model("lm_debug", **{"moe.every": 0}).num_parameters()
    expert = 3 * 16 * 32  # one SwiGLU expert
    gate = 4 * 16
    # total: the dense model minus its block-1 MLP (one expert's worth), plus gate and 4 experts
    assert model.num_parameters() == dense_part - expert + gate + 4 * expert
    # each expert takes cf*S/E tokens of S, i.e. cf = 1 expert per token on average
    assert model.num_active_parameters() == model.num_parameters() - 4 * expert * (1 - 1 / 4)


def test_vae_inference_flops_match_flop_counter_and_active_parameters():
    torch.manual_seed(0)
    model = build_model("vae_debug").eval()  # evaluation: each image runs its top-1 decoder only
    measured = _measured_flops(model, torch.rand(3, 1, 28, 28))
    acc = model.accounting()
    assert measured == acc["flops_per_token"] * 3 and acc["tokens_per_sample"] == 1
    decoder = sum(p.numel() for p in model.decoders[0].parameters())
    assert acc["num_active_parameters"] == acc["num_parameters"] - 2 * decoder  # 3 decoders, 1 used
    model.train()  # unsupervised training runs all three decoders densely
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(3, 1, 28, 28))
    assert counter.get_total_flops() == acc["train_flops_per_sample"] * 3


def test_accounting_works_on_the_meta_device():
    meta = build_model("lm_small", device="meta")
    assert next(meta.parameters()).is_meta
    assert meta.accounting() == build_model("lm_small").accounting()


def test_soft_moe_vit_flops_match_flop_counter():
    # Soft MoE: each of E experts runs C slots per routing group of S tokens, i.e. E*C/S expert
    # evaluations per token, plus the slot mixing (dispatch and combine, 2*E*C*D FLOPs per token each)
    torch.manual_seed(0)
    overrides = {"moe.router": "soft", "moe.capacity_factor": None, "moe.group_mode": "sequence", "moe.every": 1}
    overrides["moe.router_kwargs"] = {"num_slots": 2}
    model = build_model("vit_debug", **overrides).eval()
    B = 2
    measured = _measured_flops(model, torch.randn(B, 1, 28, 28))
    acc = model.accounting()
    assert measured == pytest.approx(acc["flops_per_sample"] * B, rel=1e-12)
    moe = next(m for m in model.modules() if isinstance(m, smoe.MoE))
    # vit_debug routes 2 images per group (V-MoE style), so S = 2 * 17 tokens
    assert moe.group_size == 2 * acc["tokens_per_sample"]
    assert experts_per_token(moe, acc["tokens_per_sample"]) == moe.num_experts * 2 / moe.group_size
