"""Every preset builds, runs forward and backward with a gradient for every parameter; registry, overrides and
config round trips; paper-sized presets checked on the meta device against published shapes."""

from __future__ import annotations

import json

import pytest
import torch

import smoe
from smoe.models import LMConfig, MoEConfig, VAEConfig, ViTConfig
from smoe.models.presets import (
    apply_overrides,
    build_model,
    config_from_dict,
    config_to_dict,
    get_preset,
    list_presets,
    register_preset,
)

#: presets above this size are only built on the meta device (no memory) and checked by their accounting
MAX_CPU_PARAMS = 5_000_000


def _example_batch(config):
    """A small batch that fits the preset's input contract."""
    if config.task == "lm":
        L = min(config.seq_len, 12)
        idx = torch.randint(0, config.vocab_size, (2, L))
        return idx, torch.randint(0, config.vocab_size, (2, L))
    if config.task == "vision":
        B = config.moe.images_per_group or 2
        images = torch.randn(B, config.in_channels, config.image_size, config.image_size)
        return images, torch.randint(0, config.num_classes, (B,))
    images = torch.rand(4, config.in_channels, config.image_size, config.image_size)
    return images, torch.randint(0, 10, (4,))


def _routers_of(config) -> set[str]:
    return {config.moe.router} if config.task != "vae" else set()


@pytest.mark.parametrize("name", list_presets())
def test_preset_builds_runs_and_every_parameter_gets_a_gradient(name):
    config = get_preset(name)
    missing = _routers_of(config) - set(smoe.list_routers())
    if missing:
        # a preset whose router is not (yet) registered in this checkout must fail loudly, naming the router
        with pytest.raises(ValueError, match=sorted(missing)[0]):
            build_model(name, device="meta")
        return
    meta = build_model(name, device="meta")
    acc = meta.accounting()
    assert acc["num_parameters"] == sum(p.numel() for p in {id(p): p for p in meta.parameters()}.values())
    assert 0 < acc["num_active_parameters"] <= acc["num_parameters"]
    assert acc["flops_per_token"] > 0
    if acc["num_parameters"] > MAX_CPU_PARAMS:
        return  # paper-sized: shape-only (see the GPT-2 / ViT checks below)
    torch.manual_seed(0)
    model = build_model(name)
    assert model.accounting() == acc  # the meta-device accounting is the real one
    model.train()
    inputs, targets = _example_batch(config)
    out = model(inputs, targets)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert torch.isfinite(out.aux_loss) and torch.isfinite(out.logits).all()
    layers = [m for m in model.modules() if isinstance(m, smoe.MoE)]
    assert len(out.moe_aux) == len(layers) and (len(layers) >= 1) != name.endswith("_dense")  # dense: none
    assert torch.allclose(out.aux_loss, sum((a.loss for a in out.moe_aux), torch.zeros(())))
    out.total_loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"no gradient for {no_grad}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0


def test_debug_presets_are_tiny_and_small_presets_fit_a_cpu():
    for name in ("lm_debug", "vit_debug", "vae_debug"):
        assert build_model(name, device="meta").num_parameters() < 20_000, name
    for name in ("lm_small", "vit_small", "vae_small"):
        assert build_model(name, device="meta").num_parameters() < MAX_CPU_PARAMS, name


def test_paper_sized_dense_shapes_match_published_models():
    # With the MoE layers turned off (moe.every=0) the paper-sized presets are the published dense models:
    # GPT-2 small has 124,439,808 parameters (tied embeddings, HF GPT2LMHeadModel count) and ViT-B/16 at 224 px
    # with 1000 classes 86,567,656 (timm vit_base_patch16_224).
    assert build_model("lm_gpt2_small_moe", device="meta", moe__every=0).num_parameters() == 124_439_808
    vit_b16 = build_model("vmoe_b16", device="meta", moe__every=0)
    assert vit_b16.num_parameters() == 86_567_656
    # Soft MoE paper, Table 1 (reference §6.3): ViT-B/16 35.1 GFLOP per image
    assert vit_b16.accounting()["flops_per_sample"] / 1e9 == pytest.approx(35.1, abs=0.05)


def test_vmoe_presets_place_experts_as_the_released_checkpoints():
    s32 = build_model("vmoe_s32", device="meta")
    b16 = build_model("vmoe_b16", device="meta")
    # "Last 2" of 8 blocks = the last two odd blocks 5, 7; "Every 2" of 12 = 1, 3, ..., 11 (reference §3.1.5)
    assert [i for i, b in enumerate(s32.trunk.blocks) if b.is_moe] == [5, 7]
    assert [i for i, b in enumerate(b16.trunk.blocks) if b.is_moe] == [1, 3, 5, 7, 9, 11]
    for m in s32.moe_layers() + b16.moe_layers():
        assert (m.num_experts, m.top_k) == (8, 2)
    # 8 images per group: S/32 at 224 px has 7*7 + 1 = 50 tokens per image
    assert s32.moe_layers()[0].group_size == 8 * 50
    assert b16.moe_layers()[0].group_size == 8 * 197


def test_get_preset_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="lm_debug"):
        get_preset("no_such_preset")


def test_register_preset_refuses_a_second_function_under_the_same_name():
    with pytest.raises(ValueError, match="lm_debug"):
        register_preset("lm_debug")(lambda: LMConfig())


def test_build_model_overrides_with_double_underscore_and_dots():
    model = build_model("lm_debug", moe__top_k=1, depth=4, **{"moe.num_experts": 3})
    assert model.config.depth == 4 and len(model.trunk.blocks) == 4
    assert all(m.top_k == 1 and m.num_experts == 3 for m in model.moe_layers())
    assert get_preset("lm_debug").moe.top_k == 2  # presets are not modified
    assert smoe.build_model is build_model and smoe.list_presets is list_presets


def test_build_model_from_config_does_not_modify_it():
    cfg = get_preset("vit_debug")
    model = build_model(cfg, depth=3)
    assert model.config.depth == 3 and cfg.depth == 2


def test_apply_overrides_converts_cli_strings():
    cfg = get_preset("vit_debug")
    new = apply_overrides(
        cfg,
        {
            "moe.top_k": "1",
            "moe.capacity_factor": "none",
            "moe.allow_token_coupling": "true",
            "moe.eval_capacity_factor": "0.5",
            "dropout": "0.1",
            "moe.router_kwargs": '{"noise": null}',
            "moe.layers": "[0, 1]",
            "momentum.kind": "heavy_ball",
            "pool": "mean",
        },
    )
    assert new.moe.top_k == 1 and new.moe.capacity_factor is None and new.moe.allow_token_coupling is True
    assert new.moe.eval_capacity_factor == 0.5 and new.dropout == 0.1
    assert new.moe.router_kwargs == {"noise": None} and new.moe.layers == (0, 1)
    assert new.momentum.kind == "heavy_ball" and new.pool == "mean"
    assert cfg.moe.top_k == 2 and cfg.momentum.kind is None  # the input is not modified
    # one key inside a dict field; a plain string stays a string, JSON is parsed
    new = apply_overrides(cfg, {"moe.router_kwargs.noise": "jitter", "moe.router_kwargs.noise_std": "0.5"})
    assert new.moe.router_kwargs["noise"] == "jitter" and new.moe.router_kwargs["noise_std"] == 0.5
    assert new.moe.router_kwargs["importance_loss_weight"] == 0.005
    assert apply_overrides(cfg, {"moe.layers": "1,0"}).moe.layers == (1, 0)
    assert apply_overrides(get_preset("vae_debug"), {"encoder_channels": "2,3,4"}).encoder_channels == (2, 3, 4)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"moe.topk": 1}, "moe.topk"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"depth.x": 1}, "depth.x"),
        ({"moe.top_k": "1.5"}, "moe.top_k"),
        ({"moe.top_k": 1.5}, "moe.top_k"),
        ({"moe.top_k": True}, "moe.top_k"),
        ({"moe.allow_token_coupling": "maybe"}, "moe.allow_token_coupling"),
        ({"dim": None}, "dim"),
        ({"moe.router_kwargs": "[1]"}, "moe.router_kwargs"),
        ({"moe.top_k": 9}, "top_k"),  # range check by the config itself
        ({"momentum.kind": "nesterov"}, "momentum.kind"),
        ({"moe.group_mode": "tokens"}, "group_mode"),
        ({"task": "vision"}, "task"),
        ({"num_heads": 3}, "divisible"),
    ],
)
def test_apply_overrides_rejects_unknown_keys_and_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(get_preset("lm_debug"), overrides)


@pytest.mark.parametrize("name", list_presets())
def test_config_round_trips_through_json(name):
    cfg = get_preset(name)
    d = config_to_dict(cfg)
    assert d["task"] == cfg.task
    back = config_from_dict(json.loads(json.dumps(d)))
    assert type(back) is type(cfg) and back == cfg


def test_config_from_dict_rejects_unknown_task_and_keys():
    with pytest.raises(ValueError, match="task"):
        config_from_dict({"task": "audio"})
    d = config_to_dict(get_preset("lm_debug"))
    d["moe"]["nope"] = 1
    with pytest.raises(ValueError, match="moe.nope"):
        config_from_dict(d)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="vision.image_size"):
        ViTConfig(image_size=30, patch_size=7)
    with pytest.raises(ValueError, match="moe.capacity_factor"):
        MoEConfig(capacity_factor=0)
    with pytest.raises(ValueError, match="vae.momentum.kind"):
        VAEConfig(momentum=smoe.models.MomentumConfig(kind="heavy_ball"))
    with pytest.raises(ValueError, match="out of range"):
        LMConfig(depth=2, moe=MoEConfig(layers=(5,)))
    with pytest.raises(ValueError, match="preset name or a model config"):
        build_model(3)
