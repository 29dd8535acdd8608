"""A trained run back in Python: ``smoe.load_run(path)`` returns its model (weights loaded, ``eval()`` mode), its
configuration and its tokenizer, from a run folder, one of its checkpoint folders or a ``model.safetensors``
inside one. Nothing is trained and no data is loaded: the run's ``config.json`` holds the model configuration as
it was fitted to the data.

>>> run = smoe.load_run("runs/lm")                                     # doctest: +SKIP
>>> ids = run.tokenizer.encode("ROMEO:").unsqueeze(0)                  # doctest: +SKIP
>>> print(run.tokenizer.decode(run.model.generate(ids, 100)[0]))       # doctest: +SKIP
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from smoe.data import tokenizer_from_dict
from smoe.train.checkpoint import load_checkpoint, resolve_intact_checkpoint
from smoe.train.run import RunConfig, load_run_config

__all__ = ["LoadedRun", "load_run", "find_run_dir"]


@dataclass
class LoadedRun:
    """What :func:`load_run` returns.

    Attributes:
        model: the model with the checkpoint's weights, in ``eval()`` mode, on the requested device.
        config: the run's :class:`~smoe.train.run.RunConfig` (model, training and data configuration).
        tokenizer: the language model's tokenizer (``None`` for vision and VAE runs).
        checkpoint: the checkpoint that was loaded.
        step: its training step.
        run_dir: the run folder.
    """

    model: nn.Module
    config: RunConfig
    tokenizer: Any
    checkpoint: pathlib.Path
    step: int
    run_dir: pathlib.Path

    @property
    def task(self) -> str:
        return self.config.task


def find_run_dir(ckpt: pathlib.Path) -> pathlib.Path:
    """The run folder of a checkpoint: the nearest ancestor holding ``config.json``."""
    run_dir = next((d for d in [ckpt, *ckpt.parents][:4] if (d / "config.json").is_file()), None)
    if run_dir is None:
        raise ValueError(f"no config.json of a run found above checkpoint {str(ckpt)!r}")
    return run_dir


def load_run(path: str | os.PathLike, *, device=None, use_intact: bool = False) -> LoadedRun:
    """Load a trained run for use in Python (module docstring).

    Args:
        path: a run folder (its newest checkpoint), a checkpoint folder, or a ``model.safetensors`` inside one.
        device: where to put the model (default CPU).
        use_intact: take the newest intact checkpoint when the chosen one is damaged.

    Raises:
        ValueError: nothing loadable at ``path``, or a damaged checkpoint (without ``use_intact``).
    """
    from smoe.models import presets  # noqa: PLC0415 - models import the whole layer stack

    ckpt = resolve_intact_checkpoint(path, use_intact)
    run_dir = find_run_dir(ckpt if ckpt.is_dir() else ckpt.parent)
    run, tokenizer_state = load_run_config(run_dir)
    model = presets.model_class(run.task)(run.model)
    state = load_checkpoint(ckpt, model=model, restore_rng=False)
    model.to(torch.device(device) if device is not None else torch.device("cpu")).eval()
    tokenizer = tokenizer_from_dict(tokenizer_state) if tokenizer_state is not None else None
    return LoadedRun(
        model=model, config=run, tokenizer=tokenizer, checkpoint=ckpt, step=int(state.get("step", 0)), run_dir=run_dir
    )
