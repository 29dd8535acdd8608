"""Interop: weight exchange with other libraries' MoE blocks (optional dependencies, imported lazily), and model
surgery on built models (sparse upcycling of dense FFNs, training-free router swaps)."""

from smoe.interop.hf_families import FAMILIES, from_hf, supported_block_classes, to_hf
from smoe.interop.hf_models import HFMoEBlock, convert_model, hf_moe_blocks, moe_aux_loss, save_hf
from smoe.interop.hf_upcycle import OFFLINE_MODELS, load_pretrained, load_upcycled, offline_model_path
from smoe.interop.mixtral import from_mixtral_block, to_mixtral_block
from smoe.interop.swap import swap_router
from smoe.interop.upcycle import Upcycled, UpcycledFFN, upcycle, upcycled_aux_loss

__all__ = [
    "convert_model",
    "save_hf",
    "HFMoEBlock",
    "hf_moe_blocks",
    "moe_aux_loss",
    "from_hf",
    "to_hf",
    "supported_block_classes",
    "FAMILIES",
    "to_mixtral_block",
    "from_mixtral_block",
    "swap_router",
    "upcycle",
    "Upcycled",
    "UpcycledFFN",
    "upcycled_aux_loss",
    "load_upcycled",
    "load_pretrained",
    "offline_model_path",
    "OFFLINE_MODELS",
]
