"""``TrainConfig`` (the optimisation budget of a run) and string overrides for small dataclass configs.

``--set train.lr=1e-3`` and ``--set data.tokenizer=bpe`` reach :func:`apply_dataclass_overrides`, which converts the
command-line string to the field's declared type with the project's one override parser
(:mod:`smoe.models.overrides`) and raises ``ValueError`` on an unknown key or a bad value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TrainConfig", "apply_dataclass_overrides", "NONFINITE_MODES"]

NONFINITE_MODES = ("stop", "skip")


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
        on_nonfinite: what a step with a non-finite loss or gradient norm does: ``"stop"`` (the default) raises
            :class:`~smoe.train.TrainingDiverged` naming the step, before the step is applied; ``"skip"`` applies
            nothing for that step (the batch and the learning-rate schedule move on), marks its record
            ``"skipped": true`` and counts it in ``skipped_steps``.
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
    on_nonfinite: str = "stop"

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
        if self.on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"train.on_nonfinite must be one of {NONFINITE_MODES}, got {self.on_nonfinite!r}")
        for name in ("weight_decay", "grad_clip", "bias_update_rate"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"train.{name} must be a finite number >= 0, got {v!r}")


def apply_dataclass_overrides(config, overrides: dict[str, str], *, prefix: str):
    """A copy of the dataclass ``config`` with ``overrides`` (``{field: string}``) applied.

    The one override parser of the project (:func:`smoe.models.overrides.apply_overrides`) does the work; ``prefix``
    is the name shown in errors (``"train"`` gives ``train.lr``).

    Raises:
        ValueError: unknown field (the message lists the valid ones) or a value of the wrong type.
    """
    if not overrides:
        return config
    from smoe.models.overrides import apply_overrides  # noqa: PLC0415 - keep `import smoe.train.config` light

    return apply_overrides(config, overrides, prefix=prefix)
