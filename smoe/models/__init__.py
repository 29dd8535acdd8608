"""Models: attention, the shared transformer block, the MoE LM, V-MoE, SMoE-VAE, MomentumSMoE, and presets.

>>> import torch, smoe
>>> model = smoe.build_model("lm_debug", moe__top_k=1)
>>> out = model(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8)))
>>> out.logits.shape
torch.Size([2, 8, 256])
"""

from smoe.models.accounting import AccountingMixin
from smoe.models.attention import SelfAttention
from smoe.models.block import Block, Transformer, build_transformer
from smoe.models.config import (
    LMConfig,
    ModelConfig,
    MoEConfig,
    MomentumConfig,
    VAEConfig,
    ViTConfig,
    moe_layer_indices,
    robust_momentum_coefficients,
)
from smoe.models.lm import MoELM
from smoe.models.momentum import Momentum, MomentumState
from smoe.models.output import ModelOutput
from smoe.models.presets import (
    apply_overrides,
    build_model,
    config_from_dict,
    config_to_dict,
    get_preset,
    list_presets,
    register_preset,
)
from smoe.models.vae import SMoEVAE
from smoe.models.vit import VisionMoE

__all__ = [
    "ModelOutput",
    "MoELM",
    "VisionMoE",
    "SMoEVAE",
    "SelfAttention",
    "Block",
    "Transformer",
    "build_transformer",
    "Momentum",
    "MomentumState",
    "AccountingMixin",
    "MoEConfig",
    "MomentumConfig",
    "LMConfig",
    "ViTConfig",
    "VAEConfig",
    "ModelConfig",
    "moe_layer_indices",
    "robust_momentum_coefficients",
    "register_preset",
    "list_presets",
    "get_preset",
    "build_model",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
]
