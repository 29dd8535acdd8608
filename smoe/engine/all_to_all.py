"""Expert parallelism: the all-to-all dispatcher, experts sharded over a ``torch.distributed`` process group.

With ``P`` ranks in the expert-parallel group and ``E`` experts (``E`` divisible by ``P``), rank ``r`` holds the
``E_l = E / P`` experts ``[r*E_l, (r+1)*E_l)``. Every rank routes *its own* tokens (routing groups, capacity and
balance losses are per rank, as in Megatron-Core, torchtitan and vmoe), then:

1. **dispatch**: gather the plan's rows (sorted by global expert, so the rows for each destination rank are
   contiguous); exchange the per-expert row counts (``all_to_all_single`` on ``counts_E``, ``(P, E_l)`` per rank);
   send the rows with ``all_to_all_single`` and variable splits; the rows that arrive are grouped by source rank,
   then by local expert, and are regrouped expert-major for the local experts (``counts`` = rows per local expert,
   summed over the sources).
2. the local experts run on their rows, as in one process (:mod:`smoe.experts.base`);
3. **combine**: undo the regrouping, send every row back to the rank it came from (the reverse exchange), and
   scatter ``weight_N[n] * y[n]`` into the tokens there.

Autograd runs through both exchanges (each one's backward is the reverse exchange), so the input, the router and
the local experts get their gradients; an expert's weight gradient sums the contributions of every rank's tokens.
The experts' fused op is never taken: rows must leave the process between gather and GEMM.

Dense (Soft MoE) plans are refused with a ``ValueError``: every slot mixes all tokens of a group, so expert
parallelism there means exchanging slots, not token rows, which this dispatcher does not do.

Shape legend: ``R`` input rows, ``N`` assignment rows of this rank's plan, ``M`` rows received for the local
experts, ``P`` ranks, ``E`` experts in all, ``E_l`` local experts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from smoe.engine.dispatcher import Dispatcher, register_dispatcher
from smoe.engine.ops import gather_rows, scatter_add_weighted
from smoe.routing.plan import DensePlan, RoutingPlan, SparsePlan

__all__ = ["AllToAllDispatcher", "AllToAllState", "shard_expert_state"]


def _collective(what: str, group, fn, *args, **kwargs) -> None:
    """Run one collective; a failure (a peer that exited, raised, or missed the process-group timeout) becomes an
    error that names this rank and the exchange, instead of a bare transport message."""
    try:
        fn(*args, group=group, **kwargs)
    except (RuntimeError, dist.DistError) as e:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        raise RuntimeError(
            f"expert parallelism: rank {rank} of {size}: the {what} failed; another rank of the group exited, raised "
            f"or did not reach it within the process-group timeout (its own log says why). Transport: {e}"
        ) from e


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable splits; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, output_splits: list[int], input_splits: list[int], group, what: str) -> Tensor:
        ctx.splits, ctx.group, ctx.what = (output_splits, input_splits), group, what
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        _collective(what, group, dist.all_to_all_single, out, x.contiguous(), output_splits, input_splits)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        output_splits, input_splits = ctx.splits
        out = grad.new_empty((sum(input_splits), *grad.shape[1:]))
        what = f"backward of the {ctx.what}"
        _collective(what, ctx.group, dist.all_to_all_single, out, grad.contiguous(), input_splits, output_splits)
        return out, None, None, None, None


@dataclass(frozen=True, kw_only=True)
class AllToAllState:
    """What :meth:`AllToAllDispatcher.combine` needs: the plan, the regrouping and both exchanges' splits."""

    plan: SparsePlan
    order_M: Tensor  # received row -> expert-major position
    send_splits: list[int]  # rows this rank sent to each rank
    recv_splits: list[int]  # rows this rank received from each rank


@register_dispatcher("all_to_all")
class AllToAllDispatcher(Dispatcher):
    """Experts sharded over a process group; rows move with ``all_to_all_single`` (module docstring).

    Args:
        group: the expert-parallel process group (``None``: the default group). ``torch.distributed`` must be
            initialised (``init_process_group``, or ``torchrun``).
    """

    local = False

    def __init__(self, group=None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "the all_to_all dispatcher needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group, or launch with torchrun)"
            )
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def num_local_experts(self, num_experts: int) -> int:
        if num_experts % self.size:
            raise ValueError(
                f"num_experts ({num_experts}) must be divisible by the expert-parallel size ({self.size}) "
                f"on rank {self.rank}"
            )
        return num_experts // self.size

    def first_local_expert(self, num_experts: int) -> int:
        return self.rank * self.num_local_experts(num_experts)

    def check_layer(self, layer) -> None:
        """Every rank must have built the same layer: same router with the same options, same expert type and
        sizes, same grouping. A mismatch is a ``ValueError`` at start-up naming the ranks that differ, instead of a
        wrong result or a hang in the first exchange."""
        fingerprint = _fingerprint(layer)
        everyone: list = [None] * self.size
        _collective("all_gather of the layer configurations", self.group, dist.all_gather_object, everyone, fingerprint)
        differ = [r for r, f in enumerate(everyone) if f != everyone[0]]
        if differ:
            raise ValueError(
                f"expert parallelism: rank {self.rank}: ranks {differ} built a different MoE layer than rank 0 "
                f"(rank 0: {everyone[0]}; rank {differ[0]}: {everyone[differ[0]]})"
            )

    def reduce_counts(self, counts_E: Tensor) -> Tensor:
        """``counts_E`` summed over the group (``all_reduce``): the load every rank's tokens put on each expert."""
        total = counts_E.detach().clone()
        _collective("all_reduce of the experts' loads", self.group, dist.all_reduce, total)
        return total

    def dispatch(self, x_RD: Tensor, plan: RoutingPlan) -> tuple[Tensor, Tensor, AllToAllState]:
        if isinstance(plan, DensePlan):
            raise ValueError(
                "the all_to_all dispatcher moves token rows of sparse plans; a dense (Soft MoE) plan mixes every token "
                "of a group into every slot, so its expert parallelism would exchange slots: not implemented"
            )
        if not isinstance(plan, SparsePlan):
            raise TypeError(f"plan must be a SparsePlan, got {type(plan).__name__}")
        P, E_l = self.size, self.num_local_experts(plan.num_experts)
        x_ND = gather_rows(x_RD, plan.gather_idx_N)  # sorted by global expert: contiguous per destination rank
        send_PE = plan.counts_E.view(P, E_l).contiguous()
        recv_PE = torch.empty_like(send_PE)
        # rows of each local expert, from each rank
        _collective("all_to_all of the row counts", self.group, dist.all_to_all_single, recv_PE, send_PE)
        send_splits, recv_splits = send_PE.sum(1).tolist(), recv_PE.sum(1).tolist()
        recv_MD = _AllToAll.apply(x_ND, recv_splits, send_splits, self.group, "all_to_all of the rows (dispatch)")
        # arrived grouped by (source rank, local expert): regroup expert-major, keeping the sources in rank order
        local_M = torch.repeat_interleave(
            torch.arange(E_l, device=x_RD.device).repeat(P), recv_PE.reshape(-1), output_size=recv_MD.shape[0]
        )
        order_M = torch.argsort(local_M, stable=True)
        state = AllToAllState(plan=plan, order_M=order_M, send_splits=send_splits, recv_splits=recv_splits)
        return gather_rows(recv_MD, order_M), recv_PE.sum(0), state

    def combine(self, y_MO: Tensor, state: object) -> Tensor:
        if not isinstance(state, AllToAllState):
            raise TypeError(f"unknown dispatch state {type(state).__name__}")
        out_shape = tuple(y_MO.shape[1:])
        plan = state.plan
        # back to arrival order (the inverse permutation), then each row home to the rank it came from
        back_MO = y_MO.reshape(y_MO.shape[0], math.prod(out_shape)).index_select(0, torch.argsort(state.order_M))
        y_NO = _AllToAll.apply(back_MO, state.send_splits, state.recv_splits, self.group, "all_to_all back (combine)")
        y_TO = scatter_add_weighted(y_NO, plan.weight_N.to(y_NO.dtype), plan.token_idx_N, plan.num_tokens)
        return y_TO.view(plan.num_tokens, *out_shape)

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(rank={self.rank}, size={self.size})"


def _options(module) -> dict:
    """A module's plain options (numbers, strings, flags, tuples), for comparing configurations across ranks."""
    return {
        k: v
        for k, v in sorted(vars(module).items())
        if not k.startswith("_") and k != "training" and isinstance(v, int | float | str | bool | tuple | type(None))
    }


def _fingerprint(layer) -> str:
    parts = {
        "layer": _options(layer),
        "router": (type(layer.router).__name__, _options(layer.router)),
        "experts": (type(layer.experts).__name__, layer.experts.num_experts, _options(layer.experts)),
        "parameters": [(n, tuple(p.shape)) for n, p in layer.named_parameters()],
    }
    return repr(parts)


_STACKED = re.compile(r"(^|\.)experts\.(w|b)\d_[A-Z]+$")
_MODULE = re.compile(r"^(.*?(?:^|\.)experts\.)(\d+)\.(.+)$")


def shard_expert_state(state_dict: dict[str, Tensor], num_experts: int, first: int, count: int) -> dict[str, Tensor]:
    """The part of a one-process state dict that an expert-parallel rank holds: experts ``[first, first+count)``.

    Stacked expert tensors (``experts.w1_EFD``, ...) are sliced along their expert axis; module experts
    (``experts.{e}.*``) are kept for ``e`` in range and renumbered from 0; every other entry is replicated (a
    0-d entry under a stacked name, such as an optimizer's step count of the stack, too).
    """
    out = {}
    for key, value in state_dict.items():
        if _STACKED.search(key):
            if value.dim() == 0:  # one number for the whole stack (an optimizer's step count): every rank's
                out[key] = value
                continue
            if value.shape[0] != num_experts:
                raise ValueError(f"{key} has {value.shape[0]} experts, expected {num_experts}")
            out[key] = value[first : first + count].clone()
        elif m := _MODULE.match(key):
            e = int(m.group(2))
            if first <= e < first + count:
                out[f"{m.group(1)}{e - first}.{m.group(3)}"] = value
        else:
            out[key] = value
    return out
