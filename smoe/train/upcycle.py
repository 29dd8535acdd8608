"""Upcycle a trained dense run into a new MoE run that training continues (``smoe upcycle``; reference §8.1).

:func:`upcycle_run` reads a checkpoint of a dense smoe run, applies :func:`smoe.upcycle` to its model and writes a
new run folder holding the upcycled model's configuration and one checkpoint *at the dense checkpoint's step*:

* the weights: every non-FFN tensor as it was, each chosen FFN tiled into ``E`` experts, fresh routers;
* the optimizer: the dense run's parameter-group settings (learning rate in force, weight decay); its Adam moments
  either dropped (``optimizer="fresh"``, the paper's choice for language models, which saw no gain from them) or
  tiled like the weights (``optimizer="tile"``, the paper's vision recipe: every expert gets the dense MLP's
  moments, vmoe's ``expand_tile`` on the optimizer tree); the routers start without moments either way;
* the scheduler and the trainer's counters: the dense run's, so ``smoe train --resume-from OUT`` continues the same
  warm-up + cosine schedule without a discontinuity (the paper keeps the dense run's schedule) and the data
  stream continues at the next step;
* the RNG state of the dense checkpoint.

``config.json`` keeps the dense run's training and data settings and records where the run came from
(``upcycled_from``); the dense run's ``metrics.jsonl`` up to that step is copied, so the run's history reads on.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import torch

from smoe.interop.upcycle import upcycle
from smoe.train.checkpoint import (
    _load_tensors,
    _parameter_names,
    atomic_write_text,
    load_checkpoint,
    read_json,
    resolve_intact_checkpoint,
    save_checkpoint,
)
from smoe.train.load import find_run_dir
from smoe.train.optim import build_optimizer, build_scheduler
from smoe.train.run import load_run_config
from smoe.train.trainer import copy_metrics_until

__all__ = ["upcycle_run", "fork_run", "OPTIMIZER_CHOICES"]

OPTIMIZER_CHOICES = ("fresh", "tile")


def upcycle_run(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    num_experts: int,
    top_k: int = 2,
    router: str = "token_choice",
    layers="every_other",
    noise: float = 0.0,
    capacity_factor: float | None = None,
    router_kwargs: dict | None = None,
    normalize_weights: bool = False,
    group_mode: str | None = None,
    allow_token_coupling: bool = False,
    optimizer: str | None = None,
    seed: int = 0,
    use_intact: bool = False,
) -> dict:
    """Upcycle the dense run (or checkpoint) ``source`` into the new run folder ``out`` (module docstring).

    Args:
        source: a dense run folder (its newest checkpoint), a checkpoint folder, or a ``model.safetensors`` in one.
        out: the new run folder (must not hold a run).
        num_experts, top_k, router, layers, noise, capacity_factor, router_kwargs, normalize_weights, group_mode,
            allow_token_coupling, seed: as :func:`smoe.upcycle`.
        optimizer: ``"fresh"`` or ``"tile"`` (``None``: ``"tile"`` for vision runs, ``"fresh"`` otherwise, as the
            paper).
        use_intact: take the newest intact checkpoint when the chosen one is damaged.

    Returns:
        A summary: the new folder, its checkpoint, the step, the upcycled layers and the parameter counts.
    """
    from smoe.models import presets  # noqa: PLC0415

    out = pathlib.Path(out)
    if (out / "config.json").exists():
        raise ValueError(f"{str(out)!r} already holds a run; choose another folder")
    ckpt = resolve_intact_checkpoint(source, use_intact)
    run_dir = find_run_dir(ckpt if ckpt.is_dir() else ckpt.parent)
    run, tokenizer_state = load_run_config(run_dir)
    if optimizer is None:
        optimizer = "tile" if run.task == "vision" else "fresh"
    if optimizer not in OPTIMIZER_CHOICES:
        raise ValueError(f"optimizer must be one of {OPTIMIZER_CHOICES}, got {optimizer!r}")
    model = presets.model_class(run.task)(run.model)
    with torch.random.fork_rng(devices=[]):
        state = load_checkpoint(ckpt, model=model, restore_rng=True)  # the dense checkpoint's RNG, for saving
        folder = ckpt if ckpt.is_dir() else ckpt.parent
        full = read_json(folder / "state.json", "checkpoint state") if (folder / "state.json").is_file() else {}
        dense_params = sum(p.numel() for p in model.parameters())
        up = upcycle(
            model,
            num_experts=num_experts,
            top_k=top_k,
            router=router,
            layers=layers,
            noise=noise,
            capacity_factor=capacity_factor,
            router_kwargs=router_kwargs,
            normalize_weights=normalize_weights,
            group_mode=group_mode,
            allow_token_coupling=allow_token_coupling,
            seed=seed,
        )
        # the new config must build this very model (what `smoe train --resume-from` and `smoe eval` will do)
        rebuilt = presets.model_class(run.task)(model.config, device="meta")
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} != shapes:  # pragma: no cover - invariant
            raise ValueError("the upcycled configuration does not rebuild the upcycled model")
        opt = build_optimizer(model, run.train)
        sched = build_scheduler(opt, run.train)
        if "optimizer" in full:
            for group, saved in zip(opt.param_groups, full["optimizer"]["param_groups"]):
                group.update({k: v for k, v in saved.items() if k != "params"})
            if optimizer == "tile":
                _tile_moments(model, opt, folder, full, up.tiled)
        if "scheduler" in full:
            sched.load_state_dict(full["scheduler"])
        step = int(state.get("step", 0))
        new_run = type(run)(preset=run.preset, model=model.config, train=run.train, data=run.data)
        out.mkdir(parents=True, exist_ok=True)
        record = read_json(run_dir / "config.json", "run config")
        record.update(new_run.to_dict())
        record["upcycled_from"] = {
            "checkpoint": str(ckpt),
            "step": step,
            "layers": list(up.indices),
            "optimizer": optimizer,
            "settings": up.settings,
        }
        atomic_write_text(out / "config.json", json.dumps(record, indent=1))
        if tokenizer_state is not None:
            atomic_write_text(out / "tokenizer.json", json.dumps(tokenizer_state))
        _copy_metrics(run_dir / "metrics.jsonl", out / "metrics.jsonl", step)
        new_ckpt = save_checkpoint(
            out / "checkpoints",
            step,
            model=model,
            optimizer=opt,
            scheduler=sched,
            trainer_state=full.get("trainer", {"seed": run.train.seed}),
        )
    return {
        "out": str(out),
        "checkpoint": str(new_ckpt),
        "from": str(ckpt),
        "step": step,
        "layers": list(up.layers),
        "optimizer": optimizer,
        "dense_parameters": dense_params,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _tile_moments(model, opt: torch.optim.Optimizer, folder: pathlib.Path, full: dict, tiled: dict[str, str]) -> None:
    """Adam state of the dense checkpoint onto the upcycled model: same-named parameters copy, expert tensors tile
    their dense MLP's (module docstring); parameters with no dense counterpart (routers) get none."""
    tensors = _load_tensors(folder / "optimizer.safetensors")
    scalars = full["optimizer"].get("scalars", {})
    names = _parameter_names(model)
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            source = tiled.get(name, name)
            moments = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"optim.{source}.")}
            moments = {k: v for k, v in moments.items() if k != "step" or v.dim() == 0}
            if not moments:
                continue
            new = {}
            for key, value in moments.items():
                if value.dim() and tuple(value.shape) != tuple(p.shape):
                    value = value.unsqueeze(0).expand(p.shape[0], *value.shape).clone()
                new[key] = value.to(p.device)
            for full_key, value in scalars.items():
                pname, key = full_key.rsplit(".", 1)
                if pname == source:
                    new[key] = value
            opt.state[p] = new


def _copy_metrics(src: pathlib.Path, dst: pathlib.Path, step: int) -> None:
    if src.is_file():
        copy_metrics_until(src, dst, step)


def fork_run(checkpoint: str | os.PathLike, out: str | os.PathLike) -> pathlib.Path:
    """Start run folder ``out`` as a copy of the run of ``checkpoint`` up to that checkpoint (config, tokenizer,
    metrics to its step, the checkpoint itself); returns the copied checkpoint (``smoe train --resume-from``)."""
    ckpt = pathlib.Path(checkpoint)
    run_dir = find_run_dir(ckpt)
    out = pathlib.Path(out)
    if (out / "config.json").exists():
        raise ValueError(f"{str(out)!r} already holds a run; choose another --out")
    step = int(read_json(ckpt / "state.json", "checkpoint state")["step"])
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    tmp = out / "checkpoints" / f".{ckpt.name}.tmp-{os.getpid()}"
    shutil.copytree(ckpt, tmp)
    os.replace(tmp, out / "checkpoints" / ckpt.name)
    for name in ("tokenizer.json",):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / name)
    _copy_metrics(run_dir / "metrics.jsonl", out / "metrics.jsonl", step)
    record = read_json(run_dir / "config.json", "run config")
    record["resumed_from"] = {"checkpoint": str(ckpt), "step": step}
    atomic_write_text(out / "config.json", json.dumps(record, indent=1))
    return out / "checkpoints" / ckpt.name
