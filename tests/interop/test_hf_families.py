"""Oracle tests: every supported Hugging Face MoE family against the ``transformers`` module itself.

Each case builds the HF block from a small config (no download), in float64 and eval mode, with random weights;
:func:`smoe.interop.from_hf` converts it; the outputs and the gradients of the input and of every HF weight must
agree to 1e-6. Weight gradients are compared in HF's layout: the smoe gradients are written into a copy of the block
by :func:`smoe.interop.to_hf` (a pure re-layout, so it maps gradients as it maps weights). Capacity-limited families
also compare the kept (token, expert) sets. A case skips only where ``transformers`` lacks the class.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from smoe.interop import from_hf, supported_block_classes, to_hf
from smoe.routing.plan import SparsePlan

tf = pytest.importorskip("transformers")

D, F, E, K = 8, 6, 4, 2
ATOL = 1e-6
# HF's routers take the softmax in float32 even in a float64 model (``softmax(..., dtype=torch.float)``), and so does
# smoe's (``router_logits_fp32``): the router weights' gradients, of size ~10 here, agree to float32's relative 1e-7
RTOL_ROUTER = 1e-6


def _cfg(name: str):
    heads = {"num_attention_heads": 2, "num_key_value_heads": 2}
    cases = {
        "mixtral": ("mixtral", "MixtralSparseMoeBlock", "MixtralConfig",
                    dict(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K, **heads)),
        "granitemoe": ("granitemoe", "GraniteMoeMoE", "GraniteMoeConfig",
                       dict(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K, **heads)),
        "olmoe": ("olmoe", "OlmoeSparseMoeBlock", "OlmoeConfig",
                  dict(hidden_size=D, intermediate_size=F, num_experts=E, num_experts_per_tok=K, **heads)),
        "qwen3_moe": ("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeConfig",
                      dict(hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                           norm_topk_prob=True, **heads)),
        "qwen3_moe_unnormalised": ("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeConfig",
                                   dict(hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                                        norm_topk_prob=False, **heads)),
        "dbrx_l2": ("dbrx", "DbrxFFN", "DbrxConfig",
                    dict(d_model=D, ffn_config={"ffn_hidden_size": F, "moe_num_experts": E, "moe_top_k": K,
                                                "moe_normalize_expert_weights": 2.0})),
        "dbrx_l1": ("dbrx", "DbrxFFN", "DbrxConfig",
                    dict(d_model=D, ffn_config={"ffn_hidden_size": F, "moe_num_experts": E, "moe_top_k": K,
                                                "moe_normalize_expert_weights": 1.0})),
        "qwen2_moe": ("qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeConfig",
                      dict(hidden_size=D, moe_intermediate_size=F, shared_expert_intermediate_size=5, num_experts=E,
                           num_experts_per_tok=K, **heads)),
        "qwen3_next": ("qwen3_next", "Qwen3NextSparseMoeBlock", "Qwen3NextConfig",
                       dict(hidden_size=D, moe_intermediate_size=F, shared_expert_intermediate_size=5, num_experts=E,
                            num_experts_per_tok=K, **heads)),
        "deepseek_v3": ("deepseek_v3", "DeepseekV3MoE", "DeepseekV3Config",
                        dict(hidden_size=D, moe_intermediate_size=F, n_routed_experts=8, num_experts_per_tok=K,
                             n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                             norm_topk_prob=True, **heads)),
        "deepseek_v2_groups": ("deepseek_v2", "DeepseekV2Moe", "DeepseekV2Config",
                               dict(hidden_size=D, moe_intermediate_size=F, n_routed_experts=8, num_experts_per_tok=K,
                                    n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                                    topk_method="group_limited_greedy", **heads)),
        "deepseek_v2_greedy": ("deepseek_v2", "DeepseekV2Moe", "DeepseekV2Config",
                               dict(hidden_size=D, moe_intermediate_size=F, n_routed_experts=8, num_experts_per_tok=K,
                                    n_shared_experts=2, routed_scaling_factor=1.5, topk_method="greedy", **heads)),
        "ernie4_5_moe": ("ernie4_5_moe", "Ernie4_5_MoeSparseMoeBlock", "Ernie4_5_MoeConfig",
                         dict(hidden_size=D, moe_intermediate_size=F, moe_num_experts=E, moe_k=K,
                              moe_num_shared_experts=1, **heads)),
        "switch": ("switch_transformers", "SwitchTransformersSparseMLP", "SwitchTransformersConfig",
                   dict(d_model=D, d_ff=F, num_experts=E, expert_capacity=2)),
        "gpt_oss": ("gpt_oss", "GptOssMLP", "GptOssConfig",
                    dict(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K,
                         swiglu_limit=0.7, **heads)),
        "llama4": ("llama4", "Llama4TextMoe", "Llama4TextConfig",
                   dict(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=1, **heads)),
        "llama4_top2": ("llama4", "Llama4TextMoe", "Llama4TextConfig",
                        dict(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=2, **heads)),
    }  # fmt: skip
    return cases[name]


CASES = [
    "mixtral", "granitemoe", "olmoe", "qwen3_moe", "qwen3_moe_unnormalised", "dbrx_l2", "dbrx_l1", "qwen2_moe",
    "qwen3_next", "deepseek_v3", "deepseek_v2_groups", "deepseek_v2_greedy", "ernie4_5_moe", "switch", "gpt_oss",
    "llama4", "llama4_top2",
]  # fmt: skip


def _hf_class(module: str, cls: str):
    try:
        return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls)
    except (ImportError, AttributeError):
        pytest.skip(f"transformers {tf.__version__} has no {module}.{cls}")


def make_block(name: str, seed: int = 0):
    """The HF block of case ``name`` in float64 eval mode, every weight and bias random (``N(0, 0.5)``)."""
    module, cls, cfg_name, kwargs = _cfg(name)
    block_cls = _hf_class(module, cls)
    cfg = getattr(tf, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    block = block_cls(cfg).double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for bname, b in block.named_buffers():
            if "correction_bias" in bname:
                b.copy_(0.1 * torch.randn(b.shape, generator=gen, dtype=b.dtype))
    return block


def _hf_forward(block, x):
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(x.shape)  # Llama-4 returns (B*L, D)


def _kept_pairs(plan: SparsePlan) -> set[tuple[int, int]]:
    return set(zip(plan.token_idx_N.tolist(), plan.expert_idx_N.tolist(), strict=True))


def test_every_case_names_a_supported_class():
    assert {_cfg(c)[1] for c in CASES} | {"NllbMoeSparseMLP"} == set(supported_block_classes())


@pytest.mark.parametrize("name", CASES)
def test_from_hf_equals_the_block_on_outputs_and_every_gradient(name):
    block = make_block(name)
    layer = from_hf(block)
    assert not layer.training
    x = torch.randn(3, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf = _hf_forward(block, x_hf)
    y, aux = layer(x_ours)
    torch.testing.assert_close(y, y_hf, atol=ATOL, rtol=0)
    r = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(8))
    (y_hf * r).sum().backward()
    (y * r).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_hf.grad, atol=ATOL, rtol=RTOL_ROUTER)
    # every weight's gradient, in HF's layout
    grads = copy.deepcopy(layer)
    with torch.no_grad():
        for p, g in zip(layer.parameters(), grads.parameters(), strict=True):
            g.copy_(torch.zeros_like(p) if p.grad is None else p.grad)
    grad_block = to_hf(grads, copy.deepcopy(block))
    compared = 0
    for (pname, p), (_, g) in zip(block.named_parameters(), grad_block.named_parameters(), strict=True):
        if not p.requires_grad:
            continue
        want = torch.zeros_like(p) if p.grad is None else p.grad
        rtol = RTOL_ROUTER if pname.startswith(("gate.", "router.")) else 0.0
        torch.testing.assert_close(g.double(), want.double(), atol=ATOL, rtol=rtol, msg=lambda m, n=pname: f"{n}: {m}")
        compared += 1
    assert compared == sum(p.requires_grad for p in block.parameters()) > 0
    if name == "switch":  # the capacity of 2 per sequence binds: something was dropped, the same as HF
        assert float(aux.stats["drop_rate"]) > 0
        expert_mask, _, _ = block.router(x)  # (B, L, E) one-hot of the kept assignments
        b, pos, e = expert_mask.nonzero(as_tuple=True)
        assert _kept_pairs(aux.plan) == set(zip((b * 5 + pos).tolist(), e.tolist(), strict=True))
        x9 = torch.randn(2, 9, D, dtype=torch.float64)  # the absolute capacity matches at every sequence length
        torch.testing.assert_close(layer(x9)[0], _hf_forward(block, x9), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_to_hf_round_trips_the_weights(name):
    block = make_block(name)
    layer = from_hf(block)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1)
    fresh = to_hf(layer, make_block(name, seed=3))
    x = torch.randn(2, 4, D, dtype=torch.float64)
    torch.testing.assert_close(_hf_forward(fresh, x), layer(x)[0], atol=ATOL, rtol=RTOL_ROUTER)


def test_to_hf_refuses_a_swapped_router_naming_the_block():
    from smoe.interop import swap_router

    block = make_block("olmoe")
    layer = from_hf(block)
    swap_router(layer, "usmoe")
    with pytest.raises(ValueError, match="OlmoeSparseMoeBlock"):
        to_hf(layer, block)


def test_to_hf_refuses_a_changed_routing_option():
    block = make_block("qwen3_moe")
    layer = from_hf(block)
    layer.router.renormalize = False
    with pytest.raises(ValueError, match="renormalize=False"):
        to_hf(layer, block)


def test_an_unsupported_block_is_named():
    with pytest.raises(ValueError, match="'Linear'"):
        from_hf(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "name", ["mixtral", "granitemoe", "olmoe", "qwen3_moe", "qwen2_moe", "qwen3_next", "dbrx_l1", "gpt_oss"]
)
def test_balance_loss_equals_hf_load_balancing_loss_times_k(name):
    """``balance_loss_weight = router_aux_loss_coef * K`` reproduces the family's own ``load_balancing_loss_func``
    (each model file has its copy) on the block's router logits."""
    module, *_ = _cfg(name)
    load_balancing_loss_func = importlib.import_module(
        f"transformers.models.{module}.modeling_{module}"
    ).load_balancing_loss_func
    block = make_block(name)
    layer = from_hf(block, router_kwargs={"balance_loss_weight": 1.0})
    x = torch.randn(2, 6, D, dtype=torch.float64)
    router = block.gate if hasattr(block, "gate") else block.router
    logits = router(x.view(-1, D))
    logits = logits[0] if isinstance(logits, tuple) else logits
    hf = load_balancing_loss_func((logits,), E, K)
    _, aux = layer(x)
    torch.testing.assert_close(K * aux.losses["balance"].double(), hf.double(), atol=1e-6, rtol=0)


def test_ernie_balance_loss_counts_the_unbiased_top_k_as_hf():
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import load_balancing_loss_func

    block = make_block("ernie4_5_moe")
    with torch.no_grad():  # a bias large enough to change the choice of most tokens
        block.gate.moe_statics.e_score_correction_bias.copy_(torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
    x = torch.randn(2, 6, D, dtype=torch.float64)
    logits, _, _ = block.gate(x.view(-1, D))
    hf = load_balancing_loss_func((logits,), E, K)
    unbiased = from_hf(block, router_kwargs={"balance_loss_weight": 1.0, "balance_count": "unbiased"})
    routed = from_hf(block, router_kwargs={"balance_loss_weight": 1.0})
    torch.testing.assert_close(K * unbiased(x)[1].losses["balance"].double(), hf.double(), atol=1e-6, rtol=0)
    assert abs(K * routed(x)[1].losses["balance"].item() - hf.item()) > 1e-3  # what was routed differs


def test_switch_z_and_balance_losses_equal_hf():
    from transformers.models.switch_transformers import modeling_switch_transformers as sw

    block = make_block("switch")
    layer = from_hf(block, router_kwargs={"balance_loss_weight": 1.0, "z_loss_weight": 1.0})
    x = torch.randn(3, 5, D, dtype=torch.float64)
    _, _, logits = block.router(x)  # (B, L, E): one group per sequence
    probs = logits.softmax(-1)
    hf_balance = sw.load_balancing_loss_func(probs, probs.argmax(-1))
    hf_z = sw.router_z_loss_func(logits)
    _, aux = layer(x)
    torch.testing.assert_close(aux.losses["balance"].double(), hf_balance.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(aux.losses["z"].double(), hf_z.double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("bpr", [False, True])
def test_nllb_router_kept_set_and_weights_equal_hf(before, bpr):
    """NLLB-MoE's router (top-2, absolute capacity, renormalised after -- or only before -- dropping, optional BPR).

    The oracle is the router only: in transformers 5.24 ``NllbMoeExperts`` runs only experts 0 and 1 (module
    docstring of :mod:`smoe.interop.hf_families`); each expert is checked on its own.
    """
    block_cls = _hf_class("nllb_moe", "NllbMoeSparseMLP")
    cfg = tf.NllbMoeConfig(
        d_model=D, encoder_ffn_dim=F, num_experts=E, expert_capacity=3, moe_eval_capacity_token_fraction=-1.0,
        normalize_router_prob_before_dropping=before, batch_prioritized_routing=bpr, router_bias=True,
    )  # fmt: skip
    torch.manual_seed(0)
    block = block_cls(cfg, F).double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    layer = from_hf(block)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    _, combine_TE, _ = block.router(x_hf.view(-1, D))  # (T, E) combine weights, zero where not kept
    _, aux = layer(x_ours)
    plan = aux.plan
    ours_TE = torch.zeros(12, E, dtype=torch.float64).index_put((plan.token_idx_N, plan.expert_idx_N),
                                                                 plan.weight_N.double())  # fmt: skip
    assert _kept_pairs(plan) == set(map(tuple, combine_TE.nonzero().tolist()))
    assert len(_kept_pairs(plan)) < 24  # the capacity of 3 binds
    torch.testing.assert_close(ours_TE, combine_TE, atol=ATOL, rtol=0)
    r = torch.randn(12, E, dtype=torch.float64)
    (combine_TE * r).sum().backward()
    (ours_TE * r).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_hf.grad, atol=ATOL, rtol=0)
    for e in range(E):
        torch.testing.assert_close(layer.experts.expert_forward(e, x.view(-1, D)),
                                   block.experts[f"expert_{e}"](x.view(-1, D)), atol=ATOL, rtol=0)  # fmt: skip
