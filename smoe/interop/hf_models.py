"""Whole Hugging Face MoE models on smoe layers: convert every MoE block in place, save back in HF's layout.

::

    model = AutoModelForCausalLM.from_pretrained(path)   # e.g. OLMoE, Qwen3-MoE, DeepSeek-V3, GPT-OSS, ...
    smoe.interop.convert_model(model)                    # every MoE block -> an smoe.MoE; logits unchanged
    smoe.interop.swap_router(model, "usmoe", allow_token_coupling=True)   # any router, training-free

:func:`convert_model` replaces each supported block (:func:`~smoe.interop.hf_families.supported_block_classes`)
by an :class:`HFMoEBlock`: a module with the block's call signature and return convention whose ``moe`` is the
:class:`smoe.MoE` of :func:`~smoe.interop.hf_families.from_hf`. The rest of the model (attention, norms, dense
layers, generation) is untouched. :func:`save_hf` writes the converted model with ``save_pretrained`` in HF's own
layout (safetensors, the original parameter names), so ``from_pretrained`` reads it back -- and any HF tool with
it; it refuses, naming the layer, a model whose routing no longer maps to the family's block (after a router swap).

Differences from the HF model, on purpose:

* The layers of decoder-only models are built with ``causal=True``: a swap to a token-coupling router (USMoE,
  expert choice, ...) is refused unless ``allow_token_coupling=True`` accepts that it sees later tokens.
* HF collects router logits for its auxiliary loss with forward hooks on the router modules
  (``output_router_logits=True``); those modules are gone. Each :class:`HFMoEBlock` keeps the smoe side outputs of
  its last call in ``last_aux`` (losses, statistics, plan) instead; :func:`moe_aux_loss` sums their losses.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from smoe.interop.hf_families import HFFamily, family_of, from_hf, supported_block_classes, to_hf
from smoe.layers.moe import MoE, MoEAux

__all__ = ["HFMoEBlock", "convert_model", "save_hf", "moe_aux_loss", "hf_moe_blocks"]

_ENCODER_DECODER = ("switch_transformers", "nllb_moe")


class HFMoEBlock(nn.Module):
    """An :class:`smoe.MoE` in the place of a Hugging Face MoE block (module docstring).

    ``forward(hidden_states, *args, **kwargs)`` takes what the block takes (extra arguments, such as NLLB's padding
    mask, are ignored) and returns what it returns: the output alone, or ``(output, router tensor)`` for GPT-OSS and
    Llama-4, where the second item is the router probabilities ``(T, E)`` (their decoder layers discard it).

    Attributes:
        moe: the layer.
        family: the :class:`~smoe.interop.hf_families.HFFamily` of the replaced block.
        last_aux: the :class:`~smoe.layers.moe.MoEAux` of the last call (``None`` before the first).
    """

    def __init__(self, moe: MoE, family: HFFamily, skeleton: nn.Module) -> None:
        super().__init__()
        self.moe = moe
        self.family = family
        self.last_aux: MoEAux | None = None
        # the replaced block, kept out of the module tree (a list); convert_model empties it (meta device) once
        # every block has converted. save_hf rebuilds a block from it.
        self._skeleton = [skeleton]

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        y, aux = self.moe(hidden_states)
        self.last_aux = aux
        if self.family.returns == "tuple":
            return y, aux.probs_TE
        return y

    def to_hf_block(self) -> nn.Module:
        """A fresh HF block of the replaced class holding this layer's weights (``ValueError`` if it cannot)."""
        ref = next(self.moe.parameters())
        block = copy.deepcopy(self._skeleton[0]).to_empty(device=ref.device)
        return to_hf(self.moe, block)

    def extra_repr(self) -> str:
        return f"family={self.family.name!r}"


def hf_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, block)`` of every supported HF MoE block in ``model`` (outermost first)."""
    names = set(supported_block_classes())
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in names]


def _set_submodule(model: nn.Module, qualname: str, module: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert_model(model: nn.Module, **moe_kwargs) -> list[str]:
    """Replace every supported Hugging Face MoE block of ``model`` by an :class:`HFMoEBlock`, in place.

    Args:
        model: a ``transformers`` model (any head) or a module holding MoE blocks.
        moe_kwargs: :class:`smoe.MoE` options for every layer (``backend``, ``router_kwargs``, ...); ``causal``
            defaults to ``True`` except in the encoder-decoder families (Switch, NLLB-MoE).

    Returns:
        The qualified names of the replaced blocks. ``ValueError`` if there are none (naming the model's class),
        or if a block cannot be converted (nothing is replaced then). The replaced HF blocks are emptied (moved to
        the meta device) to free their memory: do not keep references to them.
    """
    found = hf_moe_blocks(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} holds no supported Hugging Face MoE block (supported: {supported_block_classes()})"
        )
    replacements = []
    for qualname, block in found:
        if any(qualname.startswith(done + ".") for done, _ in replacements):
            continue  # nested inside a block already converted
        family = family_of(block)
        kwargs = {"causal": family.name not in _ENCODER_DECODER, **moe_kwargs}
        replacements.append((qualname, HFMoEBlock(from_hf(block, **kwargs), family, block)))
    for qualname, wrapper in replacements:
        _set_submodule(model, qualname, wrapper)
        wrapper._skeleton[0].to("meta")  # frees the HF block's storage, in place
    return [q for q, _ in replacements]


def moe_aux_loss(model: nn.Module) -> Tensor | None:
    """The sum of the weighted auxiliary losses of every :class:`HFMoEBlock`'s last call (``None`` if none ran)."""
    losses = [m.last_aux.loss for m in model.modules() if isinstance(m, HFMoEBlock) and m.last_aux is not None]
    return torch.stack(losses).sum() if losses else None


def save_hf(model: nn.Module, path: str | Path, **save_kwargs) -> Path:
    """Write a converted model with ``model.save_pretrained(path)`` in Hugging Face's layout (safetensors).

    Every :class:`HFMoEBlock` is turned back into its HF block for the write (checked first: ``ValueError`` naming
    the layer if one cannot be, e.g. after a router swap; nothing is written then), and put back after it.
    ``from_pretrained(path)`` then loads an ordinary HF model; :func:`convert_model` makes it smoe again.

    Returns:
        ``Path(path)``.
    """
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, HFMoEBlock)]
    if not wrappers:
        raise ValueError(f"{type(model).__name__} has no converted MoE block (run convert_model first)")
    blocks = []
    for qualname, wrapper in wrappers:
        try:
            blocks.append((qualname, wrapper, wrapper.to_hf_block()))
        except ValueError as e:
            raise ValueError(f"layer {qualname!r}: {e}") from None
    try:
        for qualname, _, block in blocks:
            _set_submodule(model, qualname, block)
        model.save_pretrained(str(path), **save_kwargs)
    finally:
        for qualname, wrapper, _ in blocks:
            _set_submodule(model, qualname, wrapper)
    return Path(path)
