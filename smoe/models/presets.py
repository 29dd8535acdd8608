"""Named model presets: ``register_preset`` / ``list_presets`` / ``get_preset`` / ``build_model``.

A preset is a registered function returning a fresh config (:mod:`smoe.models.config`). ``build_model`` takes a
preset name or a config plus overrides (``build_model("lm_debug", moe__top_k=1)``; ``"__"`` or ``"."`` separate
nested fields) and returns the model. ``apply_overrides``, ``config_to_dict`` and ``config_from_dict`` live in
:mod:`smoe.models.overrides` and are re-exported here.

Three kinds of presets:

* ``*_debug``: a few thousand parameters, for tests (28x28 inputs for the vision ones, so real data fits);
* ``*_small`` (and their momentum variants): train in minutes on two CPU cores (byte-level text, Fashion-MNIST);
* paper-sized, for GPUs: ``vmoe_s32``, ``vmoe_b16`` (V-MoE S/32 "Last 2" and B/16 "Every 2", E=8, K=2, as the
  released ImageNet checkpoints, reference §3.1.5), ``lm_gpt2_small_moe`` (GPT-2 small shapes, every other FFN an
  8-expert top-2 MoE), ``soft_moe_s16`` (Soft MoE S/16, 128 experts in the last 6 blocks, §6.2).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from smoe.models.config import LMConfig, MoEConfig, MomentumConfig, VAEConfig, ViTConfig
from smoe.models.lm import MoELM
from smoe.models.overrides import apply_overrides, config_from_dict, config_to_dict
from smoe.models.vae import SMoEVAE
from smoe.models.vit import VisionMoE

__all__ = [
    "register_preset",
    "list_presets",
    "get_preset",
    "build_model",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "model_class",
    "MODEL_CLASSES",
    "VMOE_ROUTER_KWARGS",
]

#: task name -> the model class its config builds (the configs themselves import no model)
MODEL_CLASSES: dict[str, type[nn.Module]] = {"lm": MoELM, "vision": VisionMoE, "vae": SMoEVAE}

_PRESETS: dict[str, Callable[[], object]] = {}


def register_preset(name: str) -> Callable[[Callable[[], object]], Callable[[], object]]:
    """Decorator registering a zero-argument function that returns a model config under ``name``."""

    def deco(fn: Callable[[], object]) -> Callable[[], object]:
        if name in _PRESETS and _PRESETS[name] is not fn:
            raise ValueError(f"preset name {name!r} is already registered")
        _PRESETS[name] = fn
        return fn

    return deco


def list_presets() -> list[str]:
    """Names of all registered presets, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str):
    """A fresh config for preset ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {list_presets()}")
    return _PRESETS[name]()


def build_model(name_or_config, *, device=None, dtype=None, **overrides) -> nn.Module:
    """Build a model from a preset name or a config, with overrides.

    Args:
        name_or_config: a preset name (:func:`list_presets`) or a config instance (not modified).
        device, dtype: where and in which dtype to create the parameters (``"meta"`` builds without memory).
        **overrides: dotted-path overrides with ``"__"`` for ``"."`` (``moe__top_k=1``, ``depth=4``).

    Returns:
        The model (``MoELM``, ``VisionMoE`` or ``SMoEVAE``); its config is ``model.config``.
    """
    if isinstance(name_or_config, str):
        config = get_preset(name_or_config)
    elif isinstance(name_or_config, LMConfig | ViTConfig | VAEConfig):
        config = copy.deepcopy(name_or_config)
    else:
        raise ValueError(f"build_model needs a preset name or a model config, got {type(name_or_config).__name__}")
    config = apply_overrides(config, overrides)
    return model_class(config.task)(config, device=device, dtype=dtype)


def model_class(task: str) -> type[nn.Module]:
    """The model class of ``task`` (``"lm"``, ``"vision"``, ``"vae"``); ``ValueError`` listing the valid ones."""
    if task not in MODEL_CLASSES:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[task]


#: V-MoE router settings (vmoe_paper configs, reference §3.1.1-3.1.4): noisy top-k with sigma = 1/E, importance
#: and load losses 0.005 each, no Switch loss, capacity rounded up to a multiple of 4.
VMOE_ROUTER_KWARGS = {
    "noise": "gaussian",
    "noise_std": 1.0,
    "importance_loss_weight": 0.005,
    "load_loss_weight": 0.005,
    "balance_loss_weight": 0.0,
}


# -- debug presets (tests) ---------------------------------------------------------------------------------------


@register_preset("lm_debug")
def lm_debug() -> LMConfig:
    """Byte-level, 2 blocks of width 16, block 1 an MoE (4 experts, top-2, dropless)."""
    return LMConfig(
        vocab_size=256,
        seq_len=32,
        dim=16,
        depth=2,
        num_heads=2,
        mlp_hidden_dim=32,
        moe=MoEConfig(num_experts=4, top_k=2, hidden_dim=32, every=2),
    )


@register_preset("vit_debug")
def vit_debug() -> ViTConfig:
    """28x28x1, patch 7, 2 blocks of width 16, block 1 a V-MoE layer (4 experts, top-2, cf 1.25, 2 images/group)."""
    return ViTConfig(
        image_size=28,
        in_channels=1,
        patch_size=7,
        num_classes=10,
        dim=16,
        depth=2,
        num_heads=2,
        mlp_hidden_dim=32,
        moe=MoEConfig(
            num_experts=4,
            top_k=2,
            every=2,
            capacity_factor=1.25,
            images_per_group=2,
            router_kwargs=dict(VMOE_ROUTER_KWARGS),
        ),
    )


@register_preset("vae_debug")
def vae_debug() -> VAEConfig:
    """28x28x1 SMoE-VAE with 3 tiny decoder experts and a 4-d latent."""
    return VAEConfig(
        latent_dim=4,
        encoder_channels=(4, 4, 4),
        decoder_channels=(2, 4),
        gate_hidden_dims=(8,),
        moe=MoEConfig(num_experts=3, top_k=1),
    )


# -- small presets (minutes on 2 CPU cores) ----------------------------------------------------------------------


@register_preset("lm_small")
def lm_small() -> LMConfig:
    """Byte-level MoE LM: 4 blocks of width 128, every FFN an MoE of 8 SwiGLU experts (F=256), top-2, dropless,
    context 128."""
    return LMConfig(
        vocab_size=256,
        seq_len=128,
        dim=128,
        depth=4,
        num_heads=4,
        mlp_hidden_dim=512,
        moe=MoEConfig(num_experts=8, top_k=2, hidden_dim=256, every=1),
    )


@register_preset("lm_study")
def lm_study() -> LMConfig:
    """The default router study's LM: ``lm_small`` at width 64 and depth 2 (8 SwiGLU experts of F=256, top-2,
    dropless, context 128). About 3x faster per step than ``lm_small``, so that 800 steps -- past the byte-level
    plateau near 2.5 nats, which ``lm_small`` has not left at the old 300-step budget -- fit 2 seeds of 5 routers in
    about 15 minutes on 2 CPU cores (measured 2026-12-03: validation loss 2.55 at step 200, 2.08 at step 800)."""
    cfg = lm_small()
    cfg.dim, cfg.depth = 64, 2
    return cfg


@register_preset("lm_small_dense")
def lm_small_dense() -> LMConfig:
    """The dense counterpart of ``lm_small``: the same trunk with a dense SwiGLU FFN of width 512 in every block
    (the active FFN width of ``lm_small``'s top-2 of experts of width 256), the model sparse upcycling starts from
    (``smoe upcycle``)."""
    cfg = lm_small()
    cfg.moe = MoEConfig(every=0)
    return cfg


@register_preset("lm_small_momentum")
def lm_small_momentum() -> LMConfig:
    """``lm_small`` with heavy-ball MomentumSMoE, the authors' LM coefficients mu=0.7, gamma=1 (§7.7)."""
    cfg = lm_small()
    cfg.momentum = MomentumConfig(kind="heavy_ball", mu=0.7, gamma=1.0)
    return cfg


@register_preset("lm_small_adamsmoe")
def lm_small_adamsmoe() -> LMConfig:
    """``lm_small`` with AdamSMoE (Adam in the first MoE layer, heavy ball after), gamma1=1, beta=(0.9, 0.999)."""
    cfg = lm_small()
    cfg.momentum = MomentumConfig(kind="adam", mu=0.7, gamma=1.0, adam_gamma=1.0, beta1=0.9, beta2=0.999)
    return cfg


@register_preset("vit_small")
def vit_small() -> ViTConfig:
    """Fashion-MNIST V-MoE: 28x28x1, patch 7 (17 tokens), 4 blocks of width 128, MoE in blocks 1 and 3
    (8 GELU experts, top-2), V-MoE router (noise 1/E, importance + load losses), cf 1.05, 8 images per group."""
    return ViTConfig(
        image_size=28,
        in_channels=1,
        patch_size=7,
        num_classes=10,
        dim=128,
        depth=4,
        num_heads=4,
        mlp_hidden_dim=256,
        moe=MoEConfig(
            num_experts=8,
            top_k=2,
            every=2,
            capacity_factor=1.05,
            images_per_group=8,
            router_kwargs=dict(VMOE_ROUTER_KWARGS),
        ),
    )


@register_preset("vit_small_dense")
def vit_small_dense() -> ViTConfig:
    """The dense counterpart of ``vit_small``: the same ViT with a dense GELU MLP (width 256, biases) in every block."""
    cfg = vit_small()
    cfg.moe = MoEConfig(every=0)
    return cfg


@register_preset("vit_small_momentum")
def vit_small_momentum() -> ViTConfig:
    """``vit_small`` with heavy-ball momentum as the authors' V-MoE code: mu=0.9, gamma=1, LayerNorm after each
    block's update (§7.6)."""
    cfg = vit_small()
    cfg.momentum = MomentumConfig(kind="heavy_ball", mu=0.9, gamma=1.0, post_norm=True)
    return cfg


@register_preset("vit_small_robust")
def vit_small_robust() -> ViTConfig:
    """``vit_small`` with Robust MomentumSMoE as the authors' V-MoE code: rho=0.2, kappa=1.25, post-norm (§7.5)."""
    cfg = vit_small()
    cfg.momentum = MomentumConfig(kind="robust", rho=0.2, kappa=1.25, post_norm=True)
    return cfg


@register_preset("vae_small")
def vae_small() -> VAEConfig:
    """The authors' SMoE-VAE on 28x28x1: "medium" encoder, "lite" decoders, latent 32, 7 experts (the paper's
    best unsupervised count), beta=0.01, lambda_lb=200, lambda_ent=400."""
    return VAEConfig()


# -- paper-sized presets (GPU) -----------------------------------------------------------------------------------


def _vmoe(**kwargs) -> ViTConfig:
    base = dict(image_size=224, in_channels=3, num_classes=1000, pool="cls", mlp_activation="gelu", bias=True)
    base.update(kwargs)
    return ViTConfig(**base)


@register_preset("vmoe_s32")
def vmoe_s32() -> ViTConfig:
    """V-MoE S/32 (ViT-S is 8 x 512 in V-MoE, MLP 2048, 8 heads), E=8, K=2, "Last 2" = blocks 5 and 7, 8 images per
    group, cf 1.05 in training and 4.0 at evaluation (vmoe ILSVRC S/32 config), 1000 classes."""
    return _vmoe(
        patch_size=32,
        dim=512,
        depth=8,
        num_heads=8,
        mlp_hidden_dim=2048,
        moe=MoEConfig(
            num_experts=8,
            top_k=2,
            every=2,
            last=2,
            capacity_factor=1.05,
            eval_capacity_factor=4.0,
            images_per_group=8,
            router_kwargs={**VMOE_ROUTER_KWARGS, "capacity_multiple_of": 4},
        ),
    )


@register_preset("vmoe_b16")
def vmoe_b16() -> ViTConfig:
    """V-MoE B/16 (12 x 768, MLP 3072, 12 heads), E=8, K=2, "Every 2" = blocks 1, 3, ..., 11, 8 images per group,
    cf 1.05, 1000 classes."""
    return _vmoe(
        patch_size=16,
        dim=768,
        depth=12,
        num_heads=12,
        mlp_hidden_dim=3072,
        moe=MoEConfig(
            num_experts=8,
            top_k=2,
            every=2,
            capacity_factor=1.05,
            images_per_group=8,
            router_kwargs={**VMOE_ROUTER_KWARGS, "capacity_multiple_of": 4},
        ),
    )


@register_preset("soft_moe_s16")
def soft_moe_s16() -> ViTConfig:
    """Soft MoE S/16: ViT-S (12 x 384, MLP 1536, 6 heads), global average pooling, the last 6 blocks Soft MoE with
    128 experts, one image per routing group (§6.2). The slot count is the ``soft`` router's default (the paper
    uses one slot per expert); the paper's query-key normalisation in attention is not implemented."""
    return _vmoe(
        patch_size=16,
        dim=384,
        depth=12,
        num_heads=6,
        mlp_hidden_dim=1536,
        pool="mean",
        moe=MoEConfig(num_experts=128, top_k=1, router="soft", every=1, last=6, group_mode="sequence"),
    )


@register_preset("lm_gpt2_small_moe")
def lm_gpt2_small_moe() -> LMConfig:
    """GPT-2 small shapes (12 x 768, 12 heads, context 1024, GELU MLP 3072 with biases, tied embeddings, vocab 50257)
    with every other FFN (blocks 1, 3, ..., 11) an MoE of 8 GELU experts, top-2, dropless."""
    return LMConfig(
        vocab_size=50257,
        seq_len=1024,
        dim=768,
        depth=12,
        num_heads=12,
        mlp_hidden_dim=3072,
        mlp_activation="gelu",
        bias=True,
        moe=MoEConfig(num_experts=8, top_k=2, every=2),
    )
