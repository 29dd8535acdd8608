"""Checkpoints that never execute code on load and are never half-written.

A checkpoint is a folder ``<run>/checkpoints/step-00000100/`` holding

* ``model.safetensors``: the model's ``state_dict`` (tied weights stored once);
* ``optimizer.safetensors``: the optimizer's per-parameter tensors (AdamW moments, step counts) keyed by parameter
  name (``optim.<parameter>.<key>``), and the RNG states;
* ``state.json``: everything else as plain JSON: step, optimizer param groups (hyperparameters and parameter
  names), scheduler state, Python/NumPy RNG states, the trainer's counters, the world it was written by.

Checkpoints do not depend on how many processes wrote them. Model weights and optimizer moments are stored in
one-process form -- every expert, numbered ``0..E-1`` -- so that a run saved with its experts sharded over ``P``
ranks resumes with any other ``P`` (``parallel=`` gathers on save and slices on load, see
:mod:`smoe.train.parallel`; rank 0 writes). Every rank's RNG state is kept; a resume on the same number of ranks
restores each, on another number rank ``r`` restores the saved rank ``r``'s state when there is one and otherwise
a state seeded from the run's seed, the step and ``r``. Checkpoints of the first format
(``smoe-checkpoint-v1``, optimizer state keyed by position) still load in one process.

``state.json`` also holds the SHA-256 of both safetensors files; loading verifies them, so damaged bytes are an
error (:class:`CheckpointDamaged`, naming the newest intact checkpoint of the run) instead of NaN weights, and a
``state.json`` whose step disagrees with its folder's name is refused.

It is written to a temporary sibling folder and moved into place with one ``os.replace``, so a crash or a kill
leaves either the previous checkpoints or the complete new one, never a torn one. Loading only parses safetensors
and JSON: a pickle (``torch.save``) file is refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import shutil
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_checkpoint",
    "atomic_write_text",
    "read_json",
    "CheckpointDamaged",
    "checkpoint_is_intact",
    "newest_intact_checkpoint",
    "resolve_intact_checkpoint",
    "verify_checkpoint",
]

FORMAT = "smoe-checkpoint-v2"
_FORMATS = ("smoe-checkpoint-v1", FORMAT)
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


class CheckpointDamaged(ValueError):
    """A checkpoint file's bytes differ from the checksum written with it; ``intact`` is the newest checkpoint of
    the same run that verifies, or ``None``."""

    def __init__(self, message: str, path: pathlib.Path, intact: pathlib.Path | None) -> None:
        super().__init__(message)
        self.path, self.intact = path, intact


_CHECKED = ("model.safetensors", "optimizer.safetensors")


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pickle_kind(path: pathlib.Path) -> str | None:
    """``"pickle"`` / ``"torch.save zip"`` when the file starts like one (never unpickled to find out)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "a pickle"
    if head == b"PK\x03\x04":
        return "a zip archive (what torch.save writes: pickled data)"
    return None


def _refuse_pickle(path: pathlib.Path) -> None:
    if not path.is_file():
        raise ValueError(f"checkpoint file {str(path)!r} is missing")
    kind = _pickle_kind(path)
    if kind is not None:
        raise ValueError(
            f"{str(path)!r} is not a valid safetensors file: it is {kind}; refusing to load it (unpickling runs code)"
        )


def _load_tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    _refuse_pickle(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a valid safetensors file ({e}); refusing to load it") from None


def _damaged_files(ckpt: pathlib.Path, state: dict) -> list[str]:
    """The files of ``ckpt`` whose bytes differ from the checksums in its ``state.json`` (none recorded: none)."""
    sums = state.get("sha256") or {}
    return [name for name, digest in sums.items() if not (ckpt / name).is_file() or _sha256(ckpt / name) != digest]


def checkpoint_is_intact(ckpt: str | os.PathLike) -> bool:
    """Whether a checkpoint folder's ``state.json`` parses and its files match their checksums."""
    ckpt = pathlib.Path(ckpt)
    try:
        state = read_json(ckpt / "state.json", "checkpoint state")
    except ValueError:
        return False
    return isinstance(state, dict) and all((ckpt / n).is_file() for n in _CHECKED) and not _damaged_files(ckpt, state)


def newest_intact_checkpoint(root: str | os.PathLike) -> pathlib.Path | None:
    """The newest checkpoint under ``root`` (a run or checkpoints folder) that verifies, or ``None``."""
    for ckpt in reversed(list_checkpoints(root)):
        if checkpoint_is_intact(ckpt):
            return ckpt
    return None


def verify_checkpoint(ckpt: pathlib.Path, state: dict) -> None:
    """``CheckpointDamaged`` when a file of ``ckpt`` differs from its checksum, naming the newest intact one."""
    for name in _CHECKED:
        if (ckpt / name).is_file():
            _refuse_pickle(ckpt / name)  # a pickle in place of a file is named as one, not just as damaged
    bad = _damaged_files(ckpt, state)
    if not bad:
        return
    intact = newest_intact_checkpoint(ckpt.parent) if ckpt.name.startswith(_PREFIX) else None
    offer = (
        f"the newest intact checkpoint of this run is {str(intact)!r} (smoe train --resume / smoe eval take it "
        "with --use-intact)"
        if intact is not None
        else "no intact checkpoint of this run is left"
    )
    raise CheckpointDamaged(
        f"checkpoint {str(ckpt)!r} is damaged: {', '.join(bad)} {'does' if len(bad) == 1 else 'do'} not match the "
        f"checksum written with it; {offer}",
        ckpt,
        intact,
    )


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # router noise / dropout drawn on the GPU
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np.asarray(np_keys).tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _join_optimizer_state_v1(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The optimizer state dict of a ``smoe-checkpoint-v1`` file (state keyed by parameter position)."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` (a tied parameter under its first name)."""
    return {id(p): n for n, p in model.named_parameters()}


def _optimizer_state_by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer, parallel=None
) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state keyed by parameter name, in one-process form: ``(tensors, meta)`` where tensors are
    ``optim.<name>.<key>`` and meta holds the param groups' hyperparameters and non-tensor values."""
    names = _parameter_names(model)
    per_key: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict[str, Any] = {}
    for p, state in optimizer.state.items():
        name = names.get(id(p))
        if name is None:
            raise ValueError("the optimizer holds a parameter that is not the model's")
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                per_key.setdefault(key, {})[name] = value.detach()
            else:
                scalars[f"{name}.{key}"] = value
    tensors: dict[str, torch.Tensor] = {}
    keys = sorted(per_key) if parallel is None else sorted(set().union(*parallel.gather_object(sorted(per_key))))
    for key in keys:
        by_name = per_key.get(key, {})
        if parallel is not None:
            by_name = parallel.global_state(model, by_name)
        tensors.update({f"optim.{name}.{key}": t.cpu().contiguous() for name, t in by_name.items()})
    # the groups' hyperparameters; which parameter is in which group is the loading optimizer's own business
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _load_optimizer_by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, parallel=None
) -> None:
    names = _parameter_names(model)
    saved_groups = meta["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, "
            f"this one {len(optimizer.param_groups)}"
        )
    per_key: dict[str, dict[str, torch.Tensor]] = {}
    for full, value in tensors.items():
        if full.startswith("optim."):
            name, key = full[len("optim.") :].rsplit(".", 1)
            per_key.setdefault(key, {})[name] = value
    if parallel is not None:
        per_key = {key: parallel.local_state(model, by_name) for key, by_name in per_key.items()}
    state_by_name: dict[str, dict] = {}
    for key, by_name in per_key.items():
        for name, value in by_name.items():
            state_by_name.setdefault(name, {})[key] = value
    for full, value in meta.get("scalars", {}).items():
        name, key = full.rsplit(".", 1)
        state_by_name.setdefault(name, {})[key] = value
    local = set(names.values())
    unknown = sorted(set(state_by_name) - local)
    if unknown:
        raise ValueError(f"the checkpoint's optimizer state names parameters this model lacks: {unknown[:3]}")
    state, groups, idx = {}, [], 0
    for saved, group in zip(saved_groups, optimizer.param_groups):
        g = {k: v for k, v in saved.items() if k != "params"}
        g["params"] = []
        for p in group["params"]:
            if names[id(p)] in state_by_name:
                state[idx] = state_by_name[names[id(p)]]
            g["params"].append(idx)
            idx += 1
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _model_state(model: nn.Module, parallel=None) -> dict[str, torch.Tensor]:
    """The model's state dict in one-process form, each tied tensor once (the first of its names)."""
    sd = model.state_dict()
    seen: dict[tuple, str] = {}
    out = {}
    for name, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = t.detach()
    if parallel is not None:
        out = parallel.global_state(model, out)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _complete_tied(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill the names of tied tensors that a file stores once (under any of their names)."""
    sd = model.state_dict()
    groups: dict[tuple, list[str]] = {}
    for name, t in sd.items():
        if t.numel():
            groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(name)
    out = dict(tensors)
    for names in groups.values():
        present = [n for n in names if n in out]
        if present and len(names) > 1:
            for n in names:
                out.setdefault(n, out[present[0]])
    return out


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def resolve_intact_checkpoint(path: str | os.PathLike, use_intact: bool = False) -> pathlib.Path:
    """:func:`resolve_checkpoint`, and with ``use_intact`` the newest intact checkpoint of the same run when the
    resolved one is damaged (``ValueError`` when none is left)."""
    ckpt = resolve_checkpoint(path)
    if use_intact and ckpt.is_dir() and not checkpoint_is_intact(ckpt):
        intact = newest_intact_checkpoint(ckpt.parent)
        if intact is None:
            raise ValueError(f"checkpoint {str(ckpt)!r} is damaged and its run has no intact checkpoint")
        ckpt = intact
    return ckpt


def _rng_seed(seed: int, step: int, rank: int) -> int:
    """A training-RNG seed for a rank the checkpoint holds no state for."""
    return (int(seed) * 1_000_003 + int(step)) * 1_009 + int(rank)


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    trainer_state: dict | None = None,
    keep: int = 0,
    parallel=None,
) -> pathlib.Path:
    """Write the checkpoint of ``step`` atomically under ``root`` (``<run>/checkpoints``); returns its folder.

    Args:
        root: the checkpoints folder.
        step: the optimizer steps taken so far.
        model, optimizer, scheduler: what to save (optimizer and scheduler optional). ``model`` is the module
            itself, not a DDP wrapper around it.
        trainer_state: JSON-able counters of the trainer.
        keep: keep only the newest ``keep`` checkpoints after writing (0 keeps all).
        parallel: the run's :class:`~smoe.train.parallel.ParallelContext` when it runs on several processes:
            every rank calls this (sharded experts are gathered), rank 0 writes, all return when it is written.
    """
    parallel = parallel if parallel is not None and parallel.distributed else None
    root = pathlib.Path(root)
    final = root / f"{_PREFIX}{step:08d}"
    model_tensors = _model_state(model, parallel)
    rng_tensors, rng_meta = _rng_state()
    opt_tensors, opt_meta = _optimizer_state_by_name(model, optimizer, parallel) if optimizer is not None else ({}, {})
    ranks = parallel.gather_object((rng_tensors["rng.torch"], rng_meta)) if parallel is not None else []
    if parallel is None or parallel.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(model_tensors, str(tmp / "model.safetensors"))
        extra: dict[str, torch.Tensor] = dict(rng_tensors)
        state: dict[str, Any] = {"format": FORMAT, "step": int(step), "rng": rng_meta, "trainer": trainer_state or {}}
        state["world"] = parallel.describe() if parallel is not None else {"world_size": 1, "expert_parallel": 1}
        if ranks:
            state["rng_ranks"] = [meta for _, meta in ranks[1:]]
            extra.update({f"rng.torch.rank{r}": t for r, (t, _) in enumerate(ranks) if r})
        if optimizer is not None:
            extra.update(opt_tensors)
            state["optimizer"] = opt_meta
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        save_file(extra, str(tmp / "optimizer.safetensors"))
        state["sha256"] = {name: _sha256(tmp / name) for name in _CHECKED}
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump(state, f)
        mode = 0o666 & ~_umask()  # safetensors writes 0600; every file of a checkpoint gets the same mode
        for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
            os.chmod(tmp / name, mode)
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
    if parallel is not None:
        parallel.barrier()  # nobody goes on (or reads it) before it is complete
    return final


def load_model_weights(model: nn.Module, path: str | os.PathLike, *, parallel=None) -> None:
    """Load ``model.safetensors`` (or any safetensors file of the model's state dict) into ``model``, strictly.

    The file holds the one-process form (every expert); with ``parallel`` (a run on several processes) each rank
    loads its own experts of it.
    """
    p = pathlib.Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    tensors = _complete_tied(model, _load_tensors(p))  # validates the format first; never unpickles
    if parallel is not None and parallel.distributed:
        tensors = parallel.local_state(model, tensors)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        detail = " ".join(line.strip() for line in str(e).strip().splitlines()[1:3])
        raise ValueError(f"checkpoint {str(p)!r} does not match the model: {first} {detail}".strip()) from None


def _checkpoint_state(p: pathlib.Path) -> dict:
    """``state.json`` of checkpoint folder ``p``, checked: an smoe format, and a step that agrees with the folder."""
    state = read_json(p / "state.json", "checkpoint state")
    if not isinstance(state, dict) or state.get("format") not in _FORMATS:
        raise ValueError(f"{str(p)!r} is not an smoe checkpoint (state.json has no format {FORMAT!r})")
    suffix = p.name[len(_PREFIX) :]
    if p.name.startswith(_PREFIX) and suffix.isdigit() and int(suffix) != state.get("step"):
        raise ValueError(
            f"{str(p / 'state.json')!r} says step {state.get('step')!r} inside folder {p.name} (step {int(suffix)}); "
            "a checkpoint's state must agree with its folder"
        )
    return state


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    restore_rng: bool = True,
    parallel=None,
) -> dict:
    """Restore a checkpoint folder (see :func:`resolve_checkpoint` for what ``path`` may be); returns ``state.json``.

    A plain ``.safetensors`` file restores the model only and returns ``{"step": 0}``. With ``parallel`` (a run on
    several processes, any number of them) every rank calls this and restores its part.

    Raises:
        ValueError: not a checkpoint, a corrupt file, or weights that do not fit the model.
    """
    parallel = parallel if parallel is not None and parallel.distributed else None
    p = resolve_checkpoint(path)
    if p.is_file():
        state = {"step": 0}
        if (p.parent / "state.json").is_file():  # a file of a checkpoint folder: verify it, report its step
            state = _checkpoint_state(p.parent)
            if p.name in state.get("sha256", {}) and _sha256(p) != state["sha256"][p.name]:
                verify_checkpoint(p.parent, {"sha256": {p.name: state["sha256"][p.name]}})
        load_model_weights(model, p, parallel=parallel)
        return {"step": int(state.get("step", 0))}
    state = _checkpoint_state(p)
    verify_checkpoint(p, state)
    load_model_weights(model, p / "model.safetensors", parallel=parallel)
    extra = _load_tensors(p / "optimizer.safetensors")
    if optimizer is not None:
        if "optimizer" not in state:
            raise ValueError(f"checkpoint {str(p)!r} holds no optimizer state")
        if state["format"] == FORMAT:
            _load_optimizer_by_name(model, optimizer, extra, state["optimizer"], parallel)
        elif parallel is not None:
            raise ValueError(
                f"checkpoint {str(p)!r} is of the first format ({state['format']}); resume it in one process "
                "once to convert it before resuming on several"
            )
        else:
            optimizer.load_state_dict(_join_optimizer_state_v1(extra, state["optimizer"]))
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        rank = parallel.rank if parallel is not None else 0
        saved_world = state.get("world", {}).get("world_size", 1)
        if rank == 0:
            _set_rng_state(extra, state["rng"])
        elif f"rng.torch.rank{rank}" in extra and saved_world == parallel.world_size:
            _set_rng_state({"rng.torch": extra[f"rng.torch.rank{rank}"]}, state["rng_ranks"][rank - 1])
        else:  # a rank the checkpoint's world did not have (or another world): a state of its own, deterministic
            _set_rng_state(extra, state["rng"])
            torch.manual_seed(_rng_seed(state.get("trainer", {}).get("seed", 0), state["step"], rank))
    return state
