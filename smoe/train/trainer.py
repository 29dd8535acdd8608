"""The training loop: AdamW + warm-up/cosine, clipping, optional bf16 autocast, evaluation, JSONL metrics,
routing diagnostics, the aux-loss-free bias update, and atomic checkpoints with exact resume.

Exact resume rests on three facts: the training batch of step ``s`` is a pure function of ``(seed, s)``
(:mod:`smoe.data.batches`); the checkpoint holds the model, the optimizer moments, the scheduler and every RNG state;
evaluation runs inside ``torch.random.fork_rng`` so it never moves the training RNG. A run killed after its
checkpoint at step ``k`` and resumed from it therefore repeats steps ``k+1..N`` bit for bit (tested).

Every model is called as ``model(inputs, targets) -> ModelOutput`` and trained on ``ModelOutput.total_loss``
(task loss + the MoE layers' weighted auxiliary losses).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from smoe.analysis.routing_stats import RoutingStatsAccumulator, summarize_layers
from smoe.routing.bias_balancing import load_counters, register_bias_update_hook
from smoe.train.checkpoint import (
    atomic_write_text,
    latest_checkpoint,
    load_checkpoint,
    newest_intact_checkpoint,
    save_checkpoint,
)
from smoe.train.config import TrainConfig
from smoe.train.optim import build_optimizer, build_scheduler
from smoe.train.parallel import ParallelContext

__all__ = ["Trainer", "TrainingDiverged", "count_parameters", "has_expert_bias"]


def copy_metrics_until(src: pathlib.Path, dst: pathlib.Path, step: int) -> None:
    """Write the records of ``metrics.jsonl`` file ``src`` with ``step <= step`` to ``dst`` atomically (``dst`` may
    be ``src``); a line torn by a crash is dropped."""
    kept = []
    for line in src.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            kept.append(line)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    os.replace(tmp, dst)


class TrainingDiverged(ValueError):
    """A training step produced a non-finite loss or gradient (``train.on_nonfinite="stop"``), or the weights
    became non-finite; ``step`` is the step that failed. Nothing of that step was applied or checkpointed."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def has_expert_bias(model: nn.Module) -> bool:
    """Whether any router of ``model`` carries an aux-loss-free expert bias (``expert_bias=True``)."""
    return any(getattr(m, "expert_bias_E", None) is not None for m in model.modules())


def count_parameters(model: nn.Module) -> dict[str, float]:
    """``{"num_parameters", "num_active_parameters"}`` from the model's own accounting when it has one."""
    if hasattr(model, "accounting"):
        acc = model.accounting()
        return {"num_parameters": acc["num_parameters"], "num_active_parameters": acc["num_active_parameters"]}
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    return {"num_parameters": total, "num_active_parameters": total}


def _tokens_in(inputs: torch.Tensor, out) -> int:
    """Tokens one forward pass routed: the first MoE layer's token count, else the input's token count."""
    for aux in out.moe_aux:
        n = getattr(aux.plan, "num_tokens", None)
        if n:
            return int(n)
    return int(inputs.numel()) if inputs.dtype == torch.long else int(inputs.shape[0])


class Trainer:
    """Trains ``model`` on ``data`` under ``config``.

    Args:
        model: an smoe model (``model(inputs, targets) -> ModelOutput``).
        data: :class:`~smoe.data.LMData` or :class:`~smoe.data.ImageData`.
        config: the optimisation budget.
        run_dir: where ``metrics.jsonl``, ``checkpoints/`` and ``final.json`` go (``None``: nothing is written).
        progress: show a tqdm progress bar on stderr.
        on_step: called as ``on_step(trainer, record)`` after every step's record is logged (tests use it to
            simulate a crash).
        desc: progress-bar label.
        device: where to train (a ``torch.device`` or its name; default CPU): the model is moved there, batches
            follow, autocast uses its type.
        parallel: where this process stands in a run on several processes (:mod:`smoe.train.parallel`); the
            model's experts are sharded and its replicated parameters wrapped in DDP here. Every rank builds the
            same model and calls the same methods; only rank 0 shows progress and writes files.
    """

    def __init__(
        self,
        model: nn.Module,
        data,
        config: TrainConfig,
        *,
        run_dir: str | os.PathLike | None = None,
        progress: bool = True,
        on_step: Callable[[Trainer, dict], None] | None = None,
        desc: str = "train",
        parallel: ParallelContext | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.parallel = parallel if parallel is not None else ParallelContext()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        model.to(self.device)
        if config.batch_size % self.parallel.world_size:
            raise ValueError(
                f"train.batch_size={config.batch_size} must be divisible by the number of processes "
                f"({self.parallel.world_size}): each trains on an equal block of the batch"
            )
        self.model, self.data, self.config = model, data, config
        self.params = count_parameters(model)  # of the whole model (before its experts are sharded)
        self.train_model = self.parallel.parallelize(model)  # the module called in training (DDP when distributed)
        self.run_dir = pathlib.Path(run_dir) if run_dir is not None else None
        self.progress, self.on_step, self.desc = progress and self.parallel.is_main, on_step, desc
        self.optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.bias_hook = (
            register_bias_update_hook(self.optimizer, model, config.bias_update_rate)
            if has_expert_bias(model)
            else None
        )
        self.step = 0
        self.skipped_steps = 0  # steps whose loss or gradient was not finite (train.on_nonfinite="skip")
        self.train_time = 0.0  # seconds spent in training steps (not evaluation or checkpoints)
        self.train_tokens = 0
        # throughput: the median of per-step token rates of this process, skipping its first steps (allocator
        # warm-up, lazy initialisation); the median also ignores slow steps caused by other jobs on a shared machine
        self.timing_warmup_steps = 3
        self._step_rates: list[float] = []
        self.history: list[dict] = []  # every record logged by this process, in order
        self.last_eval: dict | None = None

    # ------------------------------------------------------------------------------------------------ logging

    @property
    def metrics_path(self) -> pathlib.Path | None:
        return None if self.run_dir is None else self.run_dir / "metrics.jsonl"

    def log(self, record: dict) -> None:
        """Append ``record`` to ``metrics.jsonl`` (one JSON object per line) and to :attr:`history`."""
        self.history.append(record)
        if self.metrics_path is not None and self.parallel.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_log(self, step: int) -> None:
        """Drop logged records past ``step`` (a resumed run recomputes them)."""
        path = self.metrics_path
        if path is None or not path.exists() or not self.parallel.is_main:
            return
        copy_metrics_until(path, path, step)

    # ------------------------------------------------------------------------------------------------ steps

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def train_step(self) -> dict:
        """One optimizer step on the batch of the current step; returns its record."""
        cfg = self.config
        t0 = time.perf_counter()
        par = self.parallel
        self.model.train()
        inputs, targets = par.shard_batch(*(t.to(self.device) for t in self.data.train_batch(self.step)))
        with self._autocast():
            out = self.train_model(inputs, targets)
            total = out.total_loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()  # DDP averages the replicated gradients over the ranks here
        par.reduce_expert_gradients(self.model)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = par.clip_grad_norm(self.model, max_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        aux = 0.0 if out.aux_loss is None else out.aux_loss.detach()
        loss, aux = (
            par.sum_over_ranks(
                torch.stack([out.loss.detach().double(), torch.as_tensor(aux, device=out.loss.device).double()])
            )
            / par.world_size
        ).tolist()
        # every rank sees the same reduced loss and global norm, so every rank takes the same branch
        skipped = not (math.isfinite(loss) and math.isfinite(aux) and math.isfinite(float(grad_norm)))
        if skipped and cfg.on_nonfinite == "stop":
            self.optimizer.zero_grad(set_to_none=True)
            newest = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1}: loss={loss}, aux_loss={aux}, grad_norm={float(grad_norm)};"
                f" the step was not applied, the newest checkpoint ({newest or 'none'}) holds finite weights. Lower "
                f"train.lr, or pass --set train.on_nonfinite=skip to skip such steps",
                step=self.step + 1,
            )
        if skipped:  # nothing of this step is applied; the data and the schedule move on
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            for load_E in load_counters(self.model):  # nor its expert loads (aux-loss-free bias counters)
                load_E.zero_()
        else:
            par.reduce_load_counters(self.model)
            self.optimizer.step()  # the aux-loss-free bias update runs as its pre-hook
        self.scheduler.step()
        self.step += 1
        dt = time.perf_counter() - t0
        tokens = _tokens_in(inputs, out) * par.world_size
        self.train_time += dt
        self.train_tokens += tokens
        self._step_rates.append(tokens / dt if dt > 0 else 0.0)
        acc = RoutingStatsAccumulator()
        acc.add(out.moe_aux)
        routing = summarize_layers(acc.summary())
        return {
            "step": self.step,
            "split": "train",
            "loss": loss,
            "aux_loss": aux,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "load_cv": routing["load_cv"],
            "drop_rate": routing["drop_rate"],
            "entropy": routing["entropy"],
            "tokens": tokens,
            "step_time": dt,
        } | ({"skipped": True} if skipped else {})

    @torch.no_grad()
    def evaluate(self, split: str = "validation", max_batches: int | None = None) -> dict:
        """Task metrics and per-layer routing diagnostics on ``split`` (the training RNG is left untouched).

        Returns:
            ``{"step", "split", "loss", ...task metrics..., "aux_loss", "load_cv", "max_load", "dead_experts",
            "drop_rate", "unrouted", "entropy", "layers": [per-layer dicts]}``; LM adds ``ppl`` and ``bpb``
            (bits per UTF-8 byte of the split's text), vision adds ``accuracy``.
        """
        if max_batches is None:
            max_batches = self.config.eval_batches
        was_training = self.model.training
        self.model.eval()
        acc = RoutingStatsAccumulator()
        loss_sum = aux_sum = correct = count = 0.0
        extra: dict[str, float] = {}
        par = self.parallel
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), self._autocast():
            # evaluation is a function of the weights and the seed alone (the SMoE-VAE samples z in evaluation)
            torch.manual_seed(self.config.seed + par.rank)
            for inputs, targets in self.data.eval_batches(split, max_batches):
                inputs, targets = inputs.to(self.device), targets.to(self.device)
                # several processes: each takes its block of the batch's rows; a batch too small to give every
                # rank a row is run whole on every rank (the exchanges need all of them) and counted by rank 0
                counted = True
                if par.distributed:
                    if inputs.shape[0] >= par.world_size:
                        inputs, targets = (t.tensor_split(par.world_size)[par.rank] for t in (inputs, targets))
                    else:
                        counted = par.is_main
                out = self.model(inputs, targets)
                if not counted:
                    continue
                n = float(targets.numel())
                loss_sum += float(out.loss) * n
                aux_sum += (0.0 if out.aux_loss is None else float(out.aux_loss)) * n
                count += n
                if self.data.task == "vision":
                    correct += float((out.logits.argmax(-1) == targets).sum())
                for k, v in out.metrics.items():
                    if isinstance(v, torch.Tensor) and v.numel() == 1:
                        extra[k] = extra.get(k, 0.0) + float(v) * n
                acc.add(out.moe_aux)
        self.model.train(was_training)
        if par.distributed:  # the sums over every rank's rows
            keys = sorted(extra)
            sums = par.sum_over_ranks(
                torch.tensor([loss_sum, aux_sum, correct, count, *(extra[k] for k in keys)], device=self.device)
            )
            loss_sum, aux_sum, correct, count = sums[:4].tolist()
            extra = dict(zip(keys, sums[4:].tolist()))
        if count == 0:
            raise ValueError(f"the {split} split produced no evaluation batch")
        loss = loss_sum / count
        rec: dict = {"step": self.step, "split": split, "loss": loss, "aux_loss": aux_sum / count}
        if self.data.task == "lm":
            rec["ppl"] = math.exp(min(loss, 50.0))
            rec["bpb"] = loss / math.log(2) / self.data.bytes_per_token[split]
        elif self.data.task == "vision":
            rec["accuracy"] = correct / count
        rec.update({f"metric_{k}": v / count for k, v in extra.items()})
        layers = acc.summary()
        rec.update(summarize_layers(layers))
        rec["layers"] = layers
        self.last_eval = rec
        return rec

    # ------------------------------------------------------------------------------------------------ checkpoints

    def trainer_state(self) -> dict:
        return {
            "train_time": self.train_time,
            "train_tokens": self.train_tokens,
            "seed": self.config.seed,
            "skipped_steps": self.skipped_steps,
        }

    def save_checkpoint(self) -> pathlib.Path | None:
        """Checkpoint the current step under ``run_dir/checkpoints`` (atomic); ``None`` without a run folder."""
        if self.run_dir is None:
            return None
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise TrainingDiverged(
                f"training diverged at step {self.step}: the weights are not finite ({bad[:3]}); not checkpointed",
                step=self.step,
            )
        return save_checkpoint(
            self.run_dir / "checkpoints",
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=self.trainer_state(),
            keep=self.config.keep_checkpoints,
            parallel=self.parallel,
        )

    def resume(self, path: str | os.PathLike | None = None, *, use_intact: bool = False) -> int:
        """Restore everything from a checkpoint (default: the newest in ``run_dir``); returns the restored step.

        Args:
            path: the checkpoint (``None``: the newest of ``run_dir``).
            use_intact: without ``path``, take the newest checkpoint whose files match their checksums (a damaged
                newest one is otherwise an error naming it).

        Raises:
            ValueError: no checkpoint, a damaged one (:class:`~smoe.train.checkpoint.CheckpointDamaged`), or one
                that does not fit this model/optimizer.
        """
        if path is None:
            if self.run_dir is None or latest_checkpoint(self.run_dir) is None:
                raise ValueError(f"no checkpoint to resume from in {str(self.run_dir)!r}")
            path = newest_intact_checkpoint(self.run_dir) if use_intact else latest_checkpoint(self.run_dir)
            if path is None:
                raise ValueError(f"no intact checkpoint to resume from in {str(self.run_dir)!r}")
        state = load_checkpoint(
            path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, parallel=self.parallel
        )
        self.step = int(state["step"])
        trainer = state.get("trainer", {})
        self.train_time = float(trainer.get("train_time", 0.0))
        self.train_tokens = int(trainer.get("train_tokens", 0))
        self.skipped_steps = int(trainer.get("skipped_steps", 0))
        self._truncate_log(self.step)
        return self.step

    def throughput(self) -> float:
        """Training tokens per second: the median per-step rate of this process's steps after the first
        ``timing_warmup_steps`` (all steps when there are no more); 0 before any step."""
        rates = self._step_rates[self.timing_warmup_steps :] or self._step_rates
        return float(statistics.median(rates)) if rates else 0.0

    # ------------------------------------------------------------------------------------------------ loop

    def fit(self) -> dict:
        """Train until ``config.steps`` (from the current step), evaluating and checkpointing on schedule.

        Returns:
            The final validation record, plus ``tokens_per_s`` (:meth:`throughput`), ``train_time`` (seconds in
            training steps) and the parameter counts.
        """
        cfg = self.config
        if self.step == 0:  # training noise (router noise, dropout) starts from the run's seed (+ rank)
            torch.manual_seed(cfg.seed + self.parallel.rank)
            self._truncate_log(0)  # a run that starts from scratch never appends to an earlier attempt's log
        if self.run_dir is not None and self.parallel.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc=self.desc,
            disable=not self.progress,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        )
        try:
            while self.step < cfg.steps:
                rec = self.parallel.run_collective(f"training step {self.step + 1}", self.train_step)
                self.log(rec)
                bar.update(1)
                if cfg.log_every and self.step % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}")
                if self.on_step is not None:
                    self.on_step(self, rec)
                if self.step < cfg.steps:
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        self.log(self.evaluate())
                    if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                        self.save_checkpoint()
        finally:
            bar.close()
        final = self.evaluate()
        self.log(final)
        self.save_checkpoint()
        result = dict(final)
        result.update(self.params)
        result["train_time"] = self.train_time
        result["tokens_per_s"] = self.throughput()
        result["skipped_steps"] = self.skipped_steps
        result.update(self.parallel.describe())
        if self.run_dir is not None and self.parallel.is_main:
            atomic_write_text(self.run_dir / "final.json", json.dumps(result, indent=1))
        return result
