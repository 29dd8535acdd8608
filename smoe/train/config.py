"""``TrainConfig`` (the optimisation budget of a run) and string overrides for small dataclass configs.

``--set train.lr=1e-3`` and ``--set data.tokenizer=bpe`` reach :func:`apply_dataclass_overrides`, which converts the
command-line string to the field's declared type and raises ``ValueError`` on an unknown key or a bad value.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

__all__ = ["TrainConfig", "apply_dataclass_overrides", "parse_value"]


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """How a model is trained.

    Attributes:
        steps: optimizer steps of the whole run (the schedule spans them even when a run is interrupted).
        batch_size: sequences (LM) or images per step.
        lr: peak learning rate of AdamW.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio`` at the last step.
        warmup_steps: linear warm-up from ``lr / warmup_steps`` to ``lr``.
        weight_decay: AdamW decoupled weight decay on matrices (not on biases, norms, embeddings-free vectors).
        beta1, beta2: AdamW betas.
        grad_clip: clip the global gradient norm to this (0 = off).
        eval_every: evaluate every this many steps (0 = only at the end).
        eval_batches: evaluation batches (0 = the whole split).
        ckpt_every: checkpoint every this many steps (0 = only at the end); needs a run directory.
        keep_checkpoints: keep only the newest this many checkpoints (0 = keep all).
        seed: seeds model init, data order and the training RNG.
        bf16: bfloat16 autocast for the forward pass (router math stays float32).
        bias_update_rate: step of the aux-loss-free expert-bias update (routers built with ``expert_bias=True``).
        log_every: how often the progress bar refreshes its loss (every step is logged to ``metrics.jsonl``).
    """

    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 0
    eval_batches: int = 8
    ckpt_every: int = 0
    keep_checkpoints: int = 0
    seed: int = 0
    bf16: bool = False
    bias_update_rate: float = 1e-3
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"train.{name} must be a non-negative integer, got {v!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_clip", "bias_update_rate"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"train.{name} must be a finite number >= 0, got {v!r}")


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def parse_value(text: str, annotation: str, key: str):
    """Convert the command-line string ``text`` to the type named by ``annotation`` (a string annotation).

    Supports ``int``, ``float``, ``bool``, ``str`` and their ``| None`` forms (``none``/``null`` give ``None``).
    """
    kinds = [a.strip() for a in annotation.split("|")]
    if "None" in kinds and text.strip().lower() in ("none", "null"):
        return None
    kinds = [k for k in kinds if k != "None"]
    kind = kinds[0] if len(kinds) == 1 else None
    try:
        if kind == "bool":
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if kind == "int":
            return int(text)
        if kind == "float":
            value = float(text)
            return value
        if kind == "str":
            return text
    except ValueError:
        raise ValueError(f"{key}={text!r}: expected a value of type {annotation}") from None
    raise ValueError(f"{key}: fields of type {annotation} cannot be set from the command line")


def apply_dataclass_overrides(config, overrides: dict[str, str], *, prefix: str):
    """A copy of the dataclass ``config`` with ``overrides`` (``{field: string}``) applied.

    Args:
        config: a dataclass instance (e.g. :class:`TrainConfig`).
        overrides: field name to command-line string.
        prefix: the name shown in errors (``"train"`` gives ``train.lr``).

    Raises:
        ValueError: unknown field (the message lists the valid ones) or a value of the wrong type.
    """
    if not overrides:
        return config
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    changes = {}
    for key, text in overrides.items():
        if key not in fields:
            raise ValueError(f"unknown setting {prefix}.{key}; expected one of {[f'{prefix}.{k}' for k in fields]}")
        annotation = fields[key].type if isinstance(fields[key].type, str) else _name(hints[key])
        changes[key] = parse_value(text, annotation, f"{prefix}.{key}")
    return dataclasses.replace(config, **changes)


def _name(tp) -> str:
    return " | ".join(getattr(a, "__name__", str(a)).replace("NoneType", "None") for a in typing.get_args(tp) or [tp])
