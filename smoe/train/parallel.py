"""Training on several processes: data parallelism over every rank, expert parallelism inside groups of ranks.

``W`` ranks (``torchrun --nproc-per-node W``) form ``D = W / P`` expert-parallel groups of ``P`` consecutive
ranks. Inside a group the MoE layers' experts are sharded (rank ``p`` of the group holds experts
``[p E/P, (p+1) E/P)``) and token rows move with all-to-all (:mod:`smoe.engine.all_to_all`); every other parameter
is replicated on all ``W`` ranks and kept in sync by :class:`~torch.nn.parallel.DistributedDataParallel`.

Batches: the global batch of step ``s`` is the one-process batch (a pure function of the seed and ``s``); rank
``r`` trains on its ``r``-th of ``W`` equal row blocks (``batch_size`` divisible by ``W``). The loss each rank
differentiates is the mean over its own rows, so the mean over ranks is the one-process loss.

Gradients (what one process holding the whole batch would compute, the mean over all ``W`` ranks' losses):

* replicated parameters: DDP's all-reduce average over the ``W`` ranks;
* sharded experts: autograd through the exchanges already sums the gradient over the ranks of the expert group
  (rows from all of them reached the expert); the ranks that hold the *same* experts in the other ``D - 1``
  groups (the expert-data-parallel group) are then summed with an all-reduce, and the total divided by ``W``.
  DDP is told to leave these parameters alone (they differ across ranks).

Clipping uses the global gradient norm: the replicated part (equal on every rank after the reduction) plus the
experts' squared norms summed over the expert group. The aux-loss-free bias counters are summed over all ranks
before the bias update, so the replicated bias stays identical everywhere. Balance losses with
``balance_loss_scope="global"`` reduce their expert loads over every rank (the default process group), which
makes the trained function independent of ``W`` and ``P``; with the default per-group scope each rank's batch is
its own routing group, as in Megatron-Core.

Determinism: given the seed and ``W``, a run is deterministic; rank ``r`` seeds its training RNG (router noise,
dropout) with ``seed + r``. Models that draw no random numbers in training train the same function whatever
``W`` and ``P`` (to float rounding), which the tests check against one process.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from smoe.layers.expert_parallel import (
    apply_expert_parallel,
    gather_expert_state,
    shard_model_state,
    sharded_expert_names,
)
from smoe.routing.bias_balancing import load_counters

__all__ = ["ParallelContext", "init_parallel", "launched_by_torchrun"]


def launched_by_torchrun() -> bool:
    """Whether this process is a worker started by ``torchrun`` (its environment names the rank and world)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@dataclass
class ParallelContext:
    """Where this process stands among the ranks of a run (module docstring); the default is one process.

    Attributes:
        rank, world_size: of the default process group.
        expert_parallel: ``P``, ranks per expert-parallel group (1: experts are not sharded).
        ep_group: this rank's expert-parallel group (``None`` when ``P == 1``).
        expert_dp_group: the ranks holding the same experts as this one, one per expert group (``None`` when
            ``D == 1``).
    """

    rank: int = 0
    world_size: int = 1
    expert_parallel: int = 1
    ep_group: object = None
    expert_dp_group: object = None
    _expert_names: list[str] = field(default_factory=list, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_parallel(self) -> int:
        """``D = W / P``: how many copies of each expert the run holds."""
        return self.world_size // self.expert_parallel

    def describe(self) -> dict:
        return {"world_size": self.world_size, "expert_parallel": self.expert_parallel}

    # ---------------------------------------------------------------------------------------------- the model

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Shard ``model``'s experts over the expert group (in place) and return the module to call in training:
        ``model`` itself in one process, else ``model`` wrapped in DDP for the replicated parameters."""
        if not self.distributed:
            return model
        if self.expert_parallel > 1:
            apply_expert_parallel(model, self.ep_group)
        self._expert_names = sharded_expert_names(model)
        if not any(p.requires_grad for n, p in model.named_parameters() if n not in self._expert_names):
            return model  # nothing replicated to synchronise
        # DDP must not average the sharded experts (every rank holds different ones); it also must not broadcast
        # buffers each step: the replicated ones (expert biases) are kept identical by identical updates
        ddp = nn.parallel.DistributedDataParallel
        ddp._set_params_and_buffers_to_ignore_for_model(model, self._expert_names)
        # newer torch spells "no buffer broadcast before each forward" forward_sync_buffers=False; unused parameters
        # are normal here (a module expert or a shared-expert path can go without rows in a step)
        no_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
            else {"broadcast_buffers": False}
        )
        return ddp(model, find_unused_parameters=True, **no_sync)

    def expert_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        names = set(self._expert_names)
        return [p for n, p in model.named_parameters() if n in names]

    def replicated_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        names = set(self._expert_names)
        return [p for n, p in model.named_parameters() if n not in names]

    # ---------------------------------------------------------------------------------------------- a step

    def shard_batch(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """This rank's block of rows of each (global) batch tensor."""
        if not self.distributed:
            return tensors
        out = []
        for t in tensors:
            if t.shape[0] % self.world_size:
                raise ValueError(
                    f"a batch of {t.shape[0]} rows does not split over {self.world_size} ranks; choose a "
                    f"train.batch_size divisible by {self.world_size}"
                )
            n = t.shape[0] // self.world_size
            out.append(t[self.rank * n : (self.rank + 1) * n])
        return tuple(out)

    @torch.no_grad()
    def reduce_expert_gradients(self, model: nn.Module) -> None:
        """Turn the experts' gradients into the one-process gradient (module docstring): sum over the expert
        data-parallel group, divide by ``W``. Call after ``backward`` (DDP has then averaged the rest)."""
        if not self.distributed:
            return
        grads = [p.grad for p in self.expert_parameters(model) if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.expert_dp_group is not None:
            dist.all_reduce(flat, group=self.expert_dp_group)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    @torch.no_grad()
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> Tensor:
        """Clip every gradient by the global norm (as ``torch.nn.utils.clip_grad_norm_`` in one process); returns
        the norm before clipping."""
        if not self.distributed:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        rep = [p.grad for p in self.replicated_parameters(model) if p.grad is not None]
        exp = [p.grad for p in self.expert_parameters(model) if p.grad is not None]
        device = (rep + exp)[0].device if rep + exp else torch.device("cpu")
        sq = torch.zeros(2, dtype=torch.float64, device=device)
        for i, gs in enumerate((rep, exp)):
            if gs:
                sq[i] = torch.stack([g.detach().double().pow(2).sum() for g in gs]).sum()
        if self.ep_group is not None:  # every expert of the model is in this group, once
            expert_sq = sq[1:].clone()
            dist.all_reduce(expert_sq, group=self.ep_group)
            sq[1] = expert_sq[0]
        total = sq.sum().sqrt().float()
        if math.isfinite(max_norm):
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in rep + exp:
                g.mul_(coef.to(g.dtype))
        return total

    @torch.no_grad()
    def sum_over_ranks(self, values: Tensor) -> Tensor:
        """``values`` summed over every rank (a copy; float64 for the sums of metrics)."""
        out = values.detach().to(torch.float64).clone()
        if self.distributed:
            dist.all_reduce(out)
        return out

    @torch.no_grad()
    def reduce_load_counters(self, model: nn.Module) -> None:
        """Sum the aux-loss-free bias counters (``tokens_per_expert_E``) over every rank, in place."""
        if not self.distributed:
            return
        for load_E in load_counters(model):
            dist.all_reduce(load_E)

    # ---------------------------------------------------------------------------------------------- state

    def global_state(self, model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state`` (keyed by the model's names) in one-process form: sharded experts gathered (collective)."""
        return gather_expert_state(model, state) if self.expert_parallel > 1 else state

    def local_state(self, model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's part of a one-process-form ``state``."""
        return shard_model_state(model, state) if self.expert_parallel > 1 else state

    def gather_object(self, obj) -> list:
        """``obj`` of every rank, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, obj)
        return everyone

    def run_collective(self, what: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``; on several processes a failed exchange inside it (DDP's, the experts', a
        metric's) becomes an error naming this rank and ``what``: a rank that exits, raises or stalls shows up in
        the others as a transport error, which alone does not say who or where."""
        if not self.distributed:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistError) as e:
            if str(e).startswith("expert parallelism: rank"):  # named already by the dispatcher
                raise
            raise RuntimeError(
                f"rank {self.rank} of {self.world_size}: {what} failed; if the cause below is a transport error, "
                f"another rank exited, raised or did not reach the exchange within the process-group timeout (its "
                f"own log says why). Cause: {e}"
            ) from e

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_parallel(expert_parallel: int = 1, *, timeout_s: float = 300.0, backend: str | None = None) -> ParallelContext:
    """Join the run's process group (started by ``torchrun``) and build the expert groups.

    Without torchrun's environment and with ``expert_parallel == 1``, returns the one-process context.

    Args:
        expert_parallel: ``P``, ranks per expert-parallel group; must divide the world size.
        timeout_s: the process-group timeout: a rank that stops answering makes the others fail with an error
            naming their rank after at most this long.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (CUDA); ``None`` picks gloo.

    Raises:
        ValueError: a bad ``expert_parallel``, or one above 1 without a process group to run in.
    """
    if isinstance(expert_parallel, bool) or not isinstance(expert_parallel, int) or expert_parallel < 1:
        raise ValueError(f"expert_parallel must be a positive integer, got {expert_parallel!r}")
    if not (isinstance(timeout_s, int | float) and timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"the process-group timeout must be a number of seconds > 0, got {timeout_s!r}")
    if not dist.is_initialized():
        if not launched_by_torchrun():
            if expert_parallel > 1:
                raise ValueError(
                    f"expert parallelism over {expert_parallel} ranks needs {expert_parallel} processes: launch with "
                    f"torchrun --nproc-per-node {expert_parallel} (or smoe train --nproc {expert_parallel})"
                )
            return ParallelContext()
        dist.init_process_group(backend or "gloo", timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % expert_parallel:
        raise ValueError(
            f"expert_parallel={expert_parallel} must divide the number of processes ({world}) on rank {rank}"
        )
    ctx = ParallelContext(rank=rank, world_size=world, expert_parallel=expert_parallel)
    P, D = expert_parallel, world // expert_parallel
    # every rank creates every group, in the same order (torch.distributed.new_group's contract)
    for d in range(D):
        ranks = list(range(d * P, (d + 1) * P))
        group = dist.new_group(ranks) if P > 1 else None
        if rank in ranks:
            ctx.ep_group = group
    for p in range(P):
        ranks = list(range(p, world, P))
        group = dist.new_group(ranks) if D > 1 else None
        if rank in ranks:
            ctx.expert_dp_group = group
    return ctx
