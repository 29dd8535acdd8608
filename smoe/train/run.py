"""A *run*: a preset's model config + a :class:`TrainConfig` + a :class:`~smoe.data.DataConfig`, trained into a run
folder that records everything needed to resume or evaluate it.

Run folder layout::

    <run>/config.json      the resolved configuration (model, train, data), the data summary, versions
    <run>/tokenizer.json   the tokenizer (byte, or the trained BPE vocabulary) -- language models only
    <run>/metrics.jsonl    one JSON record per training step and per evaluation
    <run>/checkpoints/step-XXXXXXXX/{model.safetensors, optimizer.safetensors, state.json}
    <run>/final.json       the final validation metrics, throughput and parameter counts
    <run>/reconstructions.png, samples.png   SMoE-VAE runs: reconstructions, and samples from every decoder

Dotted overrides (``--set``) go to the right config by prefix: ``train.*`` to :class:`TrainConfig`, ``data.*`` to
:class:`~smoe.data.DataConfig`, everything else (``moe.top_k``, ``dim``, ...) to the model config through
:func:`smoe.models.presets.apply_overrides`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from smoe.data import DataConfig, build_data
from smoe.train.checkpoint import atomic_write_text, read_json
from smoe.train.config import TrainConfig, apply_dataclass_overrides
from smoe.train.trainer import Trainer

__all__ = ["RunConfig", "resolve_run_config", "prepare_run", "train_run", "load_run_config", "evaluate_run"]


def _presets():
    from smoe.models import presets  # noqa: PLC0415 - models import the whole layer stack

    return presets


@dataclass(kw_only=True)
class RunConfig:
    """Everything that defines a run.

    Attributes:
        preset: the model preset it started from (``None`` for a hand-made config).
        model: the resolved model config (a :class:`~smoe.models.config.LMConfig`, ``ViTConfig`` or ``VAEConfig``).
        train: the optimisation budget.
        data: the data options.
    """

    preset: str | None
    model: Any
    train: TrainConfig
    data: DataConfig

    @property
    def task(self) -> str:
        return self.model.task

    def to_dict(self) -> dict:
        return {
            "preset": self.preset,
            "task": self.task,
            "model": _presets().config_to_dict(self.model),
            "train": dataclasses.asdict(self.train),
            "data": dataclasses.asdict(self.data),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        try:
            return cls(
                preset=d.get("preset"),
                model=_presets().config_from_dict(d["model"]),
                train=TrainConfig(**d["train"]),
                data=DataConfig(**d["data"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"run config is incomplete or has unknown fields ({e})") from None


def split_overrides(overrides: dict[str, str]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """``(model, train, data)`` overrides from one dotted-key dict (prefixes ``train.`` and ``data.`` removed)."""
    model, train, data = {}, {}, {}
    for key, value in overrides.items():
        if key.startswith("train."):
            train[key[6:]] = value
        elif key.startswith("data."):
            data[key[5:]] = value
        else:
            model[key] = value
    return model, train, data


def resolve_run_config(
    preset: str,
    overrides: dict[str, str] | None = None,
    *,
    train: TrainConfig | None = None,
    data: DataConfig | None = None,
) -> RunConfig:
    """The preset's config with ``overrides`` applied (``ValueError`` on an unknown preset or key)."""
    presets = _presets()
    model_over, train_over, data_over = split_overrides(overrides or {})
    model_cfg = presets.apply_overrides(presets.get_preset(preset), model_over)
    train_cfg = apply_dataclass_overrides(train or TrainConfig(), train_over, prefix="train")
    data_cfg = apply_dataclass_overrides(data or DataConfig(), data_over, prefix="data")
    return RunConfig(preset=preset, model=model_cfg, train=train_cfg, data=data_cfg)


def _largest_divisor_at_most(n: int, k: int) -> int:
    return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


def fit_model_to_data(model_cfg, data) -> tuple[Any, dict]:
    """Set the model's data-dependent fields from the data (vocabulary, image geometry, classes).

    Returns:
        ``(config, changes)`` where ``changes`` maps each changed field to ``[old, new]`` (recorded in config.json).
    """
    changes: dict[str, Any] = {}
    if model_cfg.task == "lm":
        want = {"vocab_size": data.vocab_size}
        if data.seq_len > model_cfg.seq_len:
            raise ValueError(
                f"data.seq_len={data.seq_len} exceeds the model's context seq_len={model_cfg.seq_len}; "
                f"lower data.seq_len or --set seq_len={data.seq_len}"
            )
    else:
        want = {"image_size": data.image_size, "in_channels": data.channels}
        if model_cfg.task == "vision":
            want["num_classes"] = data.num_classes
            patch = model_cfg.patch_size
            if data.image_size % patch:
                want["patch_size"] = _largest_divisor_at_most(data.image_size, patch)
    for key, value in want.items():
        if getattr(model_cfg, key) != value:
            changes[key] = [getattr(model_cfg, key), value]
    if changes:
        model_cfg = dataclasses.replace(model_cfg, **{k: v[1] for k, v in changes.items()})
    return model_cfg, changes


def prepare_run(run: RunConfig, *, tokenizer_state: dict | None = None) -> tuple[nn.Module, Any, RunConfig, dict]:
    """Load the data, fit the model config to it, seed, and build the model.

    Returns:
        ``(model, data, run_config_with_fitted_model, changes)``.
    """
    model_ctx = getattr(run.model, "seq_len", None)
    data = build_data(
        run.task,
        run.data,
        batch_size=run.train.batch_size,
        seq_len=model_ctx,
        seed=run.train.seed,
        tokenizer_state=tokenizer_state,
    )
    model_cfg, changes = fit_model_to_data(run.model, data)
    data_cfg = run.data
    if data_cfg.dataset is None and not data_cfg.path:  # record which default was used
        data_cfg = dataclasses.replace(data_cfg, dataset=data.name)
    run = dataclasses.replace(run, model=model_cfg, data=data_cfg)
    torch.manual_seed(run.train.seed)
    return _presets().model_class(model_cfg.task)(model_cfg), data, run, changes


def _versions() -> dict:
    import smoe  # noqa: PLC0415

    return {"smoe": smoe.__version__, "torch": torch.__version__, "python": platform.python_version()}


def write_run_config(run_dir: pathlib.Path, run: RunConfig, data, changes: dict) -> None:
    """Write ``config.json`` (and ``tokenizer.json`` for a language model) atomically."""
    record = run.to_dict()
    record["data_info"] = data.describe()
    record["fitted_to_data"] = changes
    record["versions"] = _versions()
    record["created"] = datetime.datetime.now().isoformat(timespec="seconds")
    atomic_write_text(run_dir / "config.json", json.dumps(record, indent=1))
    if run.task == "lm":
        atomic_write_text(run_dir / "tokenizer.json", json.dumps(data.tokenizer.to_dict()))


def load_run_config(run_dir: str | os.PathLike) -> tuple[RunConfig, dict | None]:
    """``(RunConfig, tokenizer state or None)`` of an existing run folder."""
    run_dir = pathlib.Path(run_dir)
    record = read_json(run_dir / "config.json", "run config")
    if not isinstance(record, dict):
        raise ValueError(f"run config {str(run_dir / 'config.json')!r} is not a JSON object")
    tok = read_json(run_dir / "tokenizer.json", "tokenizer") if (run_dir / "tokenizer.json").exists() else None
    return RunConfig.from_dict(record), tok


def train_run(
    run: RunConfig | None,
    run_dir: str | os.PathLike | None,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step=None,
    desc: str = "train",
    parallel=None,
    use_intact: bool = False,
    device=None,
    extend_to: int | None = None,
    init_from: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> dict:
    """Train ``run`` into ``run_dir`` (``resume=True`` continues from its newest checkpoint); returns final metrics.

    The result also holds ``history``: every record this call logged.

    Resuming reads ``config.json`` and ``tokenizer.json`` of the folder, so the resumed run is the same run even if
    the caller's flags differ; the newest checkpoint then restores model, optimizer, scheduler and RNG states.

    ``extend_to`` (with ``resume``) raises the run's ``train.steps`` to this many, so a finished run trains on; the
    warm-up + cosine schedule is then that of the new total (the learning rate at the resumed step is the longer
    schedule's, higher than the decayed value the shorter one reached), and ``config.json`` records the change.
    ``init_from`` (a new run) starts from the weights of another run or checkpoint (same model configuration; the
    optimizer starts fresh), recorded in ``config.json``.

    ``checkpoint`` (with ``resume``) resumes from this checkpoint of the run instead of its newest (``smoe train
    --resume-from``); later checkpoints are overwritten as training passes their steps.

    ``parallel`` (a :class:`~smoe.train.parallel.ParallelContext`) trains on several processes: every rank calls
    this with the same arguments; rank 0 writes the run folder. A checkpoint written by any number of ranks
    resumes on any other (:mod:`smoe.train.checkpoint`).
    """
    run_dir = pathlib.Path(run_dir) if run_dir is not None else None
    tokenizer_state = None
    if resume:
        if run_dir is None or not (run_dir / "config.json").exists():
            raise ValueError(f"cannot resume: {str(run_dir)!r} holds no config.json of an earlier run")
        run, tokenizer_state = load_run_config(run_dir)
        if extend_to is not None:
            run = _extended(run, run_dir, extend_to, parallel, checkpoint)
    elif extend_to is not None or checkpoint is not None:
        raise ValueError("extend_to and checkpoint continue an earlier run: each needs resume=True")
    if run is None:
        raise ValueError("train_run needs a RunConfig unless resume=True")
    if init_from is not None and resume:
        raise ValueError("init_from starts a new run from trained weights; a resumed run has its own")
    model, data, run, changes = prepare_run(run, tokenizer_state=tokenizer_state)
    distributed = parallel is not None and parallel.distributed
    moe_cfg = getattr(run.model, "moe", None)
    if distributed and moe_cfg is not None and moe_cfg.dispatcher != "local":
        raise ValueError(
            f"moe.dispatcher={moe_cfg.dispatcher!r}: a run on several processes builds its model with the "
            "local dispatcher and shards the experts itself; choose the expert-parallel size with --expert-parallel"
        )
    if init_from is not None:
        from smoe.train.checkpoint import load_model_weights, resolve_checkpoint  # noqa: PLC0415

        source = resolve_checkpoint(init_from)
        load_model_weights(model, source if source.is_file() else source / "model.safetensors")
        changes = dict(changes, init_from=str(source))
    if run_dir is not None and (parallel is None or parallel.is_main):
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_run_config(run_dir, run, data, changes)
    trainer = Trainer(
        model,
        data,
        run.train,
        run_dir=run_dir,
        progress=progress,
        on_step=on_step,
        desc=desc,
        parallel=parallel,
        device=device,
    )
    if resume:
        trainer.resume(checkpoint, use_intact=use_intact)
    result = trainer.fit()
    if run.task == "vae" and run_dir is not None and (parallel is None or parallel.is_main):
        from smoe.analysis.vae_images import write_vae_images  # noqa: PLC0415 - matplotlib only when needed

        result["images"] = {k: str(v) for k, v in write_vae_images(model, data, run_dir, seed=run.train.seed).items()}
    result["history"] = trainer.history
    return result


def _extended(run: RunConfig, run_dir: pathlib.Path, steps: int, parallel, checkpoint=None) -> RunConfig:
    """``run`` with ``train.steps = steps`` (no fewer than the resumed checkpoint's step); ``config.json`` updated."""
    from smoe.train.checkpoint import latest_checkpoint  # noqa: PLC0415

    newest = pathlib.Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    done = int(read_json(newest / "state.json", "checkpoint state")["step"]) if newest is not None else 0
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < done:
        raise ValueError(f"--steps {steps!r} with --resume must be >= the {done} steps the run has done")
    if steps == run.train.steps:
        return run
    extended = dataclasses.replace(run, train=dataclasses.replace(run.train, steps=steps))
    if parallel is None or parallel.is_main:
        record = read_json(run_dir / "config.json", "run config")
        record["train"]["steps"] = steps
        record.setdefault("extended", []).append({"from_steps": run.train.steps, "to_steps": steps, "at_step": done})
        atomic_write_text(run_dir / "config.json", json.dumps(record, indent=1))
    return extended


def load_trained(path: str | os.PathLike, *, use_intact: bool = False):
    """A trained run's model with its checkpoint loaded, and the run's data, for evaluation and analysis.

    Returns:
        ``(model, data, run config, checkpoint folder, run folder, checkpoint state)``.
    """
    from smoe.train.checkpoint import load_checkpoint, resolve_intact_checkpoint  # noqa: PLC0415
    from smoe.train.load import find_run_dir  # noqa: PLC0415

    ckpt = resolve_intact_checkpoint(path, use_intact)
    run_dir = find_run_dir(ckpt if ckpt.is_dir() else ckpt.parent)  # the nearest ancestor holding config.json
    run, tokenizer_state = load_run_config(run_dir)
    model, data, run, _ = prepare_run(run, tokenizer_state=tokenizer_state)
    state = load_checkpoint(ckpt, model=model, restore_rng=False)
    return model, data, run, ckpt, run_dir, state


def evaluate_run(
    path: str | os.PathLike,
    *,
    split: str = "validation",
    max_batches: int | None = None,
    use_intact: bool = False,
    device=None,
) -> dict:
    """Evaluate a trained run (its folder, or one checkpoint folder inside it) on ``split``.

    ``use_intact``: when the checkpoint is damaged (its files differ from their checksums), evaluate the newest
    intact checkpoint of the same run instead (otherwise a damaged one is an error naming that one).
    """
    model, data, run, ckpt, _, state = load_trained(path, use_intact=use_intact)
    trainer = Trainer(model, data, run.train, run_dir=None, progress=False, device=device)
    trainer.step = int(state.get("step", 0))
    result = trainer.evaluate(split, max_batches)
    result.update(trainer.params)
    result["checkpoint"] = str(ckpt)
    return result
