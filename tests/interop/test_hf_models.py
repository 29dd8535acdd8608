"""Whole Hugging Face MoE models on smoe layers: built from small configs (no download), converted in place with
unchanged logits, swapped to another router training-free, saved in HF's safetensors layout and loaded back."""

from __future__ import annotations

import pytest
import torch

from smoe.interop import HFMoEBlock, convert_model, moe_aux_loss, save_hf, swap_router

tf = pytest.importorskip("transformers")

HEADS = {"num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 50, "hidden_size": 16}
MODELS = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=8, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                       norm_topk_prob=True, intermediate_size=12, head_dim=8)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                         n_shared_experts=1, routed_scaling_factor=2.5, num_hidden_layers=2, first_k_dense_replace=1,
                         intermediate_size=12, q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4,
                         qk_nope_head_dim=4, v_head_dim=4)),
}  # fmt: skip


def make_model(name: str):
    cfg_name, model_name, kwargs = MODELS[name]
    if not hasattr(tf, model_name):
        pytest.skip(f"transformers {tf.__version__} has no {model_name}")
    cfg = getattr(tf, cfg_name)(**HEADS, **kwargs)
    torch.manual_seed(0)
    model = getattr(tf, model_name)(cfg).double().eval()
    model.set_experts_implementation("eager")  # HF's grouped_mm kernel takes no float64
    with torch.no_grad():  # HF initialises some expert tensors to zero or leaves them empty: make every one random
        for n, p in model.named_parameters():
            if "experts" in n or n.endswith("gate.weight"):
                p.normal_(0, 0.3)
        for n, b in model.named_buffers():
            if "correction_bias" in n:
                b.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_keeps_the_logits_and_swap_router_then_works(name, tmp_path):
    model = make_model(name)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids).logits
    replaced = convert_model(model)
    assert replaced and all(isinstance(model.get_submodule(q), HFMoEBlock) for q in replaced)
    after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    assert moe_aux_loss(model) is not None
    # save in HF's layout and load back as an ordinary HF model
    out = save_hf(model, tmp_path / "converted")
    assert (out / "model.safetensors").exists()
    reloaded = type(model).from_pretrained(out, dtype=torch.float64, experts_implementation="eager").eval()
    assert not any(isinstance(m, HFMoEBlock) for m in reloaded.modules())
    torch.testing.assert_close(reloaded(input_ids=ids).logits, before, atol=1e-6, rtol=1e-6)
    convert_model(reloaded)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, before, atol=1e-6, rtol=1e-6)
    # training-free router swap: a causal model refuses a coupling router unless told, then it runs
    with pytest.raises(ValueError, match="later tokens"):
        swap_router(model, "usmoe")
    swapped = swap_router(model, "usmoe", allow_token_coupling=True)
    assert len(swapped) == len(replaced)
    logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, before)
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.\d\.mlp'"):  # a swapped model no longer maps to HF
        save_hf(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_convert_model_names_a_model_without_moe_blocks():
    with pytest.raises(ValueError, match="Linear holds no supported"):
        convert_model(torch.nn.Linear(3, 3))


def test_generate_runs_on_a_converted_model():
    model = make_model("olmoe")
    ids = torch.randint(0, 50, (1, 4))
    want = model.generate(ids, max_new_tokens=5, do_sample=False)
    convert_model(model)
    got = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)
