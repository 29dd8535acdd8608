"""Sparse upcycling (Komatsuzaki et al. 2023): the upcycled model computes the dense model's function when the
combine weights sum to one; the experts are independent copies; Hugging Face models keep generating and saving.

Routers compute their weights in float32 (selective precision) whatever the model's dtype, so "exact" means equal
to float32 rounding of the weights (~1e-7 relative to the FFN output); every other difference is float64 rounding.
A router that does not keep the function is off by ~1e-3 relative on these models, four orders above that.
"""

import pathlib
import re

import pytest
import torch

import smoe
from smoe.interop.upcycle import dense_ffn_sites, upcycle

F64 = torch.float64
TOL = 1e-6  # relative to the largest reference value
DOC = pathlib.Path(__file__).parents[2] / "docs" / "upcycling.md"
transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers")


def _close(a, b, tol=TOL):
    return float((a - b).detach().abs().max()) <= tol * float(b.detach().abs().max())


def _dense_lm(**over):
    return smoe.build_model("lm_debug", moe__every=0, dtype=F64, **over).eval()


def _tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).to(F64).eval()


def _tiny_bert():
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    return transformers.BertModel(cfg).to(F64).eval()


SUM_TO_ONE = {"order": "topk_softmax"}


# -- the function is kept -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", ["all", "every_other", [0]])
def test_upcycled_lm_equals_dense(layers):
    model = _dense_lm()
    x = torch.randint(0, 256, (3, 16))
    ref = model(x).logits
    up = upcycle(model, num_experts=4, top_k=2, router_kwargs=SUM_TO_ONE, layers=layers)
    assert len(model.moe_layers()) == len(up.layers) == (2 if layers == "all" else 1)
    assert _close(model(x).logits, ref)
    # the rewritten config describes the model: a model built from it has the same parameters and loads strictly
    rebuilt = smoe.models.MoELM(model.config, dtype=F64).eval()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(x).logits, model(x).logits)


def test_upcycled_lm_gradients_equal_dense():
    """Not only the outputs: right after upcycling, the input embedding's gradient is the dense model's too."""
    dense = _dense_lm()
    moe2 = _dense_lm()
    moe2.load_state_dict(dense.state_dict())
    upcycle(moe2, num_experts=4, top_k=2, router_kwargs={"renormalize": True}, layers="all")
    x = torch.randint(0, 256, (2, 12))
    y = torch.randint(0, 256, (2, 12))
    g_dense = torch.autograd.grad(dense(x, y).loss, dense.tok_emb.weight)[0]
    g_moe = torch.autograd.grad(moe2(x, y).loss, moe2.tok_emb.weight)[0]
    assert _close(g_moe, g_dense, 1e-5)


def test_upcycled_vit_equals_dense():
    model = smoe.build_model("vit_debug", moe__every=0, dtype=F64).eval()
    x = torch.randn(4, 1, 28, 28, dtype=F64)
    ref = model(x).logits
    upcycle(model, num_experts=4, top_k=2, router_kwargs=SUM_TO_ONE, layers="all")
    assert [type(e).__name__ for e in (m.experts for m in model.moe_layers())] == ["GELUExperts"] * 2
    assert all(m.experts.bias for m in model.moe_layers())  # the ViT MLP's biases are copied too
    assert _close(model(x).logits, ref)


def test_vision_recipe_expert_choice_normalised_keeps_routed_tokens():
    """The paper's vision recipe: expert choice, C=2, weights normalised after routing: a token some expert took
    gets exactly its dense FFN output; a token none took gets none (the initial drop of §8.3)."""
    model = smoe.build_model("vit_debug", moe__every=0, dtype=F64).eval()
    x = torch.randn(4, 1, 28, 28, dtype=F64)
    blocks = model.trunk.blocks
    inputs = {}
    blocks[1].ffn.register_forward_hook(lambda m, a, out: inputs.update(x=a[0], y=out))
    model(x)
    dense_ffn = blocks[1].ffn
    upcycle(model, num_experts=4, top_k=2, router="expert_choice", layers=[1], normalize_weights=True)
    moe = blocks[1].ffn
    y_moe, aux = moe(inputs["x"])
    routed_T = torch.bincount(aux.plan.token_idx_N, minlength=aux.plan.num_tokens) > 0
    y_TD, ref_TD = y_moe.reshape(-1, y_moe.shape[-1]), dense_ffn(inputs["x"]).reshape(-1, y_moe.shape[-1])
    assert routed_T.any()
    assert _close(y_TD[routed_T], ref_TD[routed_T])
    assert torch.equal(y_TD[~routed_T], torch.zeros_like(y_TD[~routed_T]))


def _router_table() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*`(\w+)`\s*\|\s*(yes|no)\s*\|\s*(yes|no|refused)\s*\|", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def test_router_table_lists_every_router():
    assert sorted(_router_table()) == smoe.list_routers()


@pytest.mark.parametrize("router", smoe.list_routers())
def test_router_table_is_measured(router):
    """docs/upcycling.md says, per router with its default options, whether upcycling keeps the dense function,
    and whether it does with ``normalize_weights=True`` for the tokens some expert takes; both are measured here
    on one upcycled layer (the last block, so a token's logits depend on its own MoE output only)."""
    default, normalised = _router_table()[router]
    x = torch.randint(0, 256, (4, 16))
    for column, normalize in ((default, False), (normalised, True)):
        model = _dense_lm()
        ref = model(x).logits
        try:
            upcycle(
                model,
                num_experts=4,
                top_k=2,
                router=router,
                layers=[1],
                allow_token_coupling=True,
                normalize_weights=normalize,
            )
        except ValueError:
            assert column == "refused"
            continue
        assert column != "refused"
        out = model(x)
        plan = out.moe_aux[0].plan
        err_BL = (out.logits - ref).abs().amax(-1) / ref.abs().max()
        if normalize:  # judged on the tokens some expert took
            routed = (torch.bincount(plan.token_idx_N, minlength=plan.num_tokens) > 0).reshape(err_BL.shape)
            err_BL = err_BL[routed]
        kept = bool(err_BL.max() <= TOL)
        assert kept == (column == "yes"), (
            f"{router} normalize={normalize}: max relative error {float(err_BL.max()):.2e}"
        )


# -- the experts are independent copies ---------------------------------------------------------------------


def test_experts_are_independent_copies():
    model = _dense_lm()
    dense_w1 = model.trunk.blocks[1].ffn.w1.weight.detach().clone()
    up = upcycle(model, num_experts=4, top_k=2, layers=[1])
    experts = model.trunk.blocks[1].ffn.experts
    before = {n: p.detach().clone() for n, p in experts.named_parameters()}
    assert all(torch.equal(before["w1_EFD"][e], dense_w1) for e in range(4))
    assert up.tiled["trunk.blocks.1.ffn.experts.w1_EFD"] == "trunk.blocks.1.ffn.w1.weight"
    assert up.fresh == ("trunk.blocks.1.ffn.router.gate.weight",)
    # train expert 2 alone: only its slices move
    opt = torch.optim.SGD(experts.parameters(), lr=0.1)
    experts.expert_forward(2, torch.randn(5, 16, dtype=F64)).square().sum().backward()
    opt.step()
    for name, p in experts.named_parameters():
        for e in range(4):
            assert torch.equal(p[e], before[name][e]) == (e != 2), (name, e)


def test_noise_perturbs_each_copy_and_is_seeded():
    a, b, c = _dense_lm(), _dense_lm(), _dense_lm()
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    w = a.trunk.blocks[1].ffn.w1.weight.detach().clone()
    upcycle(a, num_experts=3, noise=0.1, seed=5, layers=[1])
    upcycle(b, num_experts=3, noise=0.1, seed=5, layers=[1])
    upcycle(c, num_experts=3, noise=0.1, seed=6, layers=[1])
    wa = a.trunk.blocks[1].ffn.experts.w1_EFD.detach()
    assert torch.equal(wa, b.trunk.blocks[1].ffn.experts.w1_EFD)
    assert not torch.equal(wa, c.trunk.blocks[1].ffn.experts.w1_EFD)
    assert not torch.equal(wa[0], wa[1])
    rel = float((wa - w).std() / w.std())
    assert 0.05 < rel < 0.2  # noise * std(w)


def test_upcycle_leaves_the_global_rng_alone():
    model = _dense_lm()
    state = torch.get_rng_state()
    upcycle(model, num_experts=4, noise=0.5, layers="all")
    assert torch.equal(torch.get_rng_state(), state)


# -- Hugging Face models ------------------------------------------------------------------------------------


def test_upcycled_llama_equals_dense_and_generates(tmp_path):
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 9))
    ref = model(ids).logits
    greedy = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    up = upcycle(model, num_experts=3, top_k=2, router_kwargs=SUM_TO_ONE, layers="all")
    assert up.layers == ("model.layers.0.mlp.moe", "model.layers.1.mlp.moe")
    assert up.tiled["model.layers.0.mlp.moe.experts.w3_EFD"] == "model.layers.0.mlp.up_proj.weight"
    assert _close(model(ids).logits, ref)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=6, do_sample=False), greedy)
    model.save_pretrained(tmp_path)
    loaded = smoe.interop.load_upcycled(tmp_path)
    assert loaded.dtype == F64
    assert type(loaded.model.layers[1].mlp).__name__ == "UpcycledFFN"
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_upcycled_llama_trains_with_aux_loss():
    model = _tiny_llama().train()
    upcycle(model, num_experts=4, top_k=2, layers="every_other")
    ids = torch.randint(0, 64, (2, 9))
    out = model(ids, labels=ids)
    aux = smoe.interop.upcycled_aux_loss(model)
    assert aux is not None and aux.item() > 0  # the Switch balance loss of the one MoE layer
    (out.loss + aux).backward()
    assert model.model.layers[1].mlp.moe.router.gate.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.gate_proj.weight.grad is not None  # block 0 stays dense


def test_upcycled_bert_equals_dense(tmp_path):
    model = _tiny_bert()
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ref = model(ids, attention_mask=mask).last_hidden_state
    up = upcycle(model, num_experts=3, top_k=2, router_kwargs=SUM_TO_ONE)
    assert up.layers == ("encoder.layer.1.intermediate.moe",)
    assert up.tiled["encoder.layer.1.intermediate.moe.experts.b2_ED"] == "encoder.layer.1.output.dense.bias"
    assert _close(model(ids, attention_mask=mask).last_hidden_state, ref)
    model.save_pretrained(tmp_path)
    loaded = smoe.interop.load_upcycled(tmp_path)
    assert torch.equal(
        loaded(ids, attention_mask=mask).last_hidden_state, model(ids, attention_mask=mask).last_hidden_state
    )


# -- bad input ----------------------------------------------------------------------------------------------


def test_bad_upcycles_are_refused_and_change_nothing():
    model = _dense_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not one of the model's 2 dense FFNs"):
        upcycle(model, num_experts=4, layers=[5])
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        upcycle(model, num_experts=0)
    with pytest.raises(ValueError, match="top_k"):
        upcycle(model, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="noise"):
        upcycle(model, num_experts=2, noise=-1.0)
    with pytest.raises(ValueError, match="layers must be one of"):
        upcycle(model, num_experts=2, layers="odd")
    with pytest.raises(ValueError, match="unknown router"):
        upcycle(model, num_experts=2, router="nope")
    with pytest.raises(ValueError, match="leak|compete"):  # expert choice in a causal LM, batch groups
        upcycle(model, num_experts=2, router="expert_choice")
    assert model.config.moe.every == 0 and not model.moe_layers()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    upcycle(model, num_experts=2, layers=[0])
    with pytest.raises(ValueError, match="MoE layers already"):
        upcycle(model, num_experts=2, layers=[1])
    with pytest.raises(ValueError, match="momentum"):
        upcycle(_dense_lm(momentum__kind="heavy_ball"), num_experts=2)
    with pytest.raises(ValueError, match="no dense FFN"):
        upcycle(torch.nn.Linear(3, 3), num_experts=2)


def test_hf_refuses_routers_it_cannot_feed_and_double_upcycling():
    model = _tiny_llama()
    with pytest.raises(ValueError, match="token ids"):
        upcycle(model, num_experts=2, router="hash")
    upcycle(model, num_experts=2)
    with pytest.raises(ValueError, match="upcycled already"):
        upcycle(model, num_experts=2, layers=[0])


def test_sites_are_found_in_depth_order():
    assert [s.index for s in dense_ffn_sites(_tiny_llama())] == [0, 1]
    assert [s.name for s in dense_ffn_sites(_tiny_bert())] == [
        "encoder.layer.0.intermediate",
        "encoder.layer.1.intermediate",
    ]


def test_normalize_weights_equals_renormalising_router():
    """``MoE(normalize_weights=True)`` on token choice = the router's own ``renormalize=True``; a Soft MoE router
    (dense plan) is refused."""
    x = torch.randn(10, 8, dtype=F64)
    a = smoe.MoE(8, 16, 4, 2, dtype=F64, normalize_weights=True)
    b = smoe.MoE(8, 16, 4, 2, dtype=F64, router_kwargs={"renormalize": True})
    b.load_state_dict(a.state_dict())
    ya, aux = a(x)
    yb, _ = b(x)
    assert torch.allclose(ya, yb, atol=1e-12)
    sums = torch.zeros(10, dtype=aux.plan.weight_N.dtype).index_add(0, aux.plan.token_idx_N, aux.plan.weight_N)
    assert torch.allclose(sums, torch.ones_like(sums))
    with pytest.raises(ValueError, match="sparse plan"):
        smoe.MoE(8, 16, 4, 1, router="soft", normalize_weights=True)
