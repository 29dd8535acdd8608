"""Checkpoints that never execute code on load and are never half-written.

A checkpoint is a folder ``<run>/checkpoints/step-00000100/`` holding

* ``model.safetensors``: the model's ``state_dict`` (tied weights stored once, via ``safetensors.torch.save_model``);
* ``optimizer.safetensors``: the optimizer's per-parameter tensors (AdamW moments, step counts) and the RNG states;
* ``state.json``: everything else as plain JSON: step, optimizer param groups, scheduler state, Python/NumPy RNG
  states, the trainer's counters.

It is written to a temporary sibling folder and moved into place with one ``os.replace``, so a crash or a kill
leaves either the previous checkpoints or the complete new one, never a torn one. Loading only parses safetensors
and JSON: a pickle (``torch.save``) file is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_checkpoint",
    "atomic_write_text",
    "read_json",
]

FORMAT = "smoe-checkpoint-v1"
_PREFIX = "step-"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (readers never see half a file)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file; ``ValueError`` naming the file when it is missing or not valid JSON."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise ValueError(f"{what} {str(p)!r} does not exist")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {str(p)!r} is not valid JSON ({e})") from None


def _load_tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"checkpoint file {str(path)!r} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a valid safetensors file ({e}); refusing to load it") from None


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state()}
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np.asarray(np_keys).tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def list_checkpoints(root: str | os.PathLike) -> list[pathlib.Path]:
    """Complete checkpoint folders under ``root`` (a run folder or its ``checkpoints`` folder), oldest first."""
    root = pathlib.Path(root)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        suffix = p.name[len(_PREFIX) :]
        if p.is_dir() and p.name.startswith(_PREFIX) and suffix.isdigit() and (p / "state.json").is_file():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> pathlib.Path | None:
    """The newest complete checkpoint under ``root``, or ``None``."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> pathlib.Path:
    """A checkpoint folder from a checkpoint folder, a run folder (its newest checkpoint), or ``model.safetensors``.

    Raises:
        ValueError: nothing usable at ``path``.
    """
    p = pathlib.Path(path)
    if p.is_file():
        return p
    if (p / "state.json").is_file() and (p / "model.safetensors").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise ValueError(f"no checkpoint found at {str(p)!r} (expected a run folder, a checkpoint folder or a file)")
    return latest


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    trainer_state: dict | None = None,
    keep: int = 0,
) -> pathlib.Path:
    """Write the checkpoint of ``step`` atomically under ``root`` (``<run>/checkpoints``); returns its folder.

    Args:
        root: the checkpoints folder.
        step: the optimizer steps taken so far.
        model, optimizer, scheduler: what to save (optimizer and scheduler optional).
        trainer_state: JSON-able counters of the trainer.
        keep: keep only the newest ``keep`` checkpoints after writing (0 keeps all).
    """
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    rng_tensors, rng_meta = _rng_state()
    extra: dict[str, torch.Tensor] = dict(rng_tensors)
    state: dict[str, Any] = {"format": FORMAT, "step": int(step), "rng": rng_meta, "trainer": trainer_state or {}}
    if optimizer is not None:
        opt_tensors, opt_meta = _split_optimizer_state(optimizer.state_dict())
        extra.update(opt_tensors)
        state["optimizer"] = opt_meta
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    save_file(extra, str(tmp / "optimizer.safetensors"))
    with open(tmp / "state.json", "w", encoding="utf-8") as f:
        json.dump(state, f)
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # re-saving a step (after a resume): move the old one aside first
        old = root / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    if keep > 0:
        for old_ckpt in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old_ckpt)
    return final


def load_model_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load ``model.safetensors`` (or any safetensors file of the model's state dict) into ``model``, strictly."""
    p = pathlib.Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    _load_tensors(p)  # validates the format before anything else; never unpickles
    try:
        load_model(model, str(p), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {str(p)!r} does not match the model: {first}") from None


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    restore_rng: bool = True,
) -> dict:
    """Restore a checkpoint folder (see :func:`resolve_checkpoint` for what ``path`` may be); returns ``state.json``.

    A plain ``.safetensors`` file restores the model only and returns ``{"step": 0}``.

    Raises:
        ValueError: not a checkpoint, a corrupt file, or weights that do not fit the model.
    """
    p = resolve_checkpoint(path)
    if p.is_file():
        load_model_weights(model, p)
        return {"step": 0}
    state = read_json(p / "state.json", "checkpoint state")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(p)!r} is not an smoe checkpoint (state.json has no format {FORMAT!r})")
    load_model_weights(model, p / "model.safetensors")
    extra = _load_tensors(p / "optimizer.safetensors")
    if optimizer is not None:
        if "optimizer" not in state:
            raise ValueError(f"checkpoint {str(p)!r} holds no optimizer state")
        optimizer.load_state_dict(_join_optimizer_state(extra, state["optimizer"]))
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        _set_rng_state(extra, state["rng"])
    return state
