"""Dispatchers move tokens to experts and back: ``dispatch(x, plan) -> (x_ND, counts_E, state)`` and
``combine(y_ND, state) -> y``. They hold no parameters and never compute an expert.

Between the two calls the experts run on rows grouped by expert (:mod:`smoe.experts.base`)::

    x_ND, counts_E, state = dispatcher.dispatch(x_RD, plan)
    y_ND = experts(x_ND, counts_E, kernel=...)
    y_T = dispatcher.combine(y_ND, state)

For a sparse plan (:class:`~smoe.routing.plan.SparsePlan`), dispatch gathers row ``source_idx_N[n]`` of the input
for every assignment row (the plan's rows are already sorted by expert), and combine scatters
``weight_N[n] * y_ND[n]`` into token ``token_idx_N[n]`` (:mod:`smoe.engine.ops`). For a dense plan (Soft MoE,
:class:`~smoe.routing.plan.DensePlan`), dispatch mixes each group's tokens into ``C`` slots per expert and group
(expert-major rows, ``counts_E = G*C`` each) and combine mixes the slot outputs back into tokens. Outputs may have
any trailing shape (``(N, *out)``: an image decoder as an expert); combine works on their flattened rows.

:class:`LocalDispatcher` does this inside one process. When the experts offer a fused gather -> experts -> combine
op (``experts.can_fuse``; the default SwiGLU experts do) and the backend allows it, its :meth:`~Dispatcher.run`
takes that op instead of the three steps: an optimisation of the local case only, checked equal to the seam on
outputs and every gradient. A dispatcher that moves rows between processes (expert parallelism,
:mod:`smoe.engine.all_to_all`) implements ``dispatch`` and ``combine`` with its exchanges, says how many experts
this process holds (``num_local_experts``), and inherits the un-fused ``run``.

Dispatchers are registered by name (``register_dispatcher`` / ``get_dispatcher`` / ``list_dispatchers``), so that
``smoe.MoE(..., dispatcher="local")`` can name one.

Shape legend: ``R`` input rows, ``T`` output tokens, ``N`` rows grouped by expert, ``E`` experts, ``D`` width,
``G`` groups of ``S`` tokens, ``C`` slots per expert and group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from smoe.engine.ops import gather_rows, scatter_add_weighted
from smoe.experts.base import Experts
from smoe.registry import Registry
from smoe.routing.plan import DensePlan, RoutingPlan, SparsePlan

__all__ = [
    "Dispatcher",
    "LocalDispatcher",
    "SparseDispatchState",
    "DenseDispatchState",
    "register_dispatcher",
    "get_dispatcher",
    "list_dispatchers",
    "build_dispatcher",
]


@dataclass(frozen=True, kw_only=True)
class SparseDispatchState:
    """What :meth:`LocalDispatcher.combine` needs of a sparse dispatch: the plan."""

    plan: SparsePlan


@dataclass(frozen=True, kw_only=True)
class DenseDispatchState:
    """What :meth:`LocalDispatcher.combine` needs of a dense dispatch: the plan (its combine weights)."""

    plan: DensePlan


class Dispatcher:
    """Base class: ``dispatch`` / ``combine`` for both plan forms, and ``run`` = dispatch -> experts -> combine."""

    #: registry name (set by :func:`register_dispatcher`)
    registry_name: ClassVar[str | None] = None
    #: whether every expert lives in this process (the reference engine and the fused op need that)
    local: ClassVar[bool] = False

    def num_local_experts(self, num_experts: int) -> int:
        """How many of the ``num_experts`` experts this process holds (all of them unless experts are sharded)."""
        return num_experts

    def first_local_expert(self, num_experts: int) -> int:
        """The global index of this process's first expert."""
        return 0

    def check_layer(self, layer) -> None:
        """Called once by the MoE layer that uses this dispatcher, after it is built (multi-process dispatchers
        check there that every process built the same layer)."""

    def reduce_counts(self, counts_E: Tensor) -> Tensor:
        """Per-expert counts summed over the processes that route into these experts (here: this one)."""
        return counts_E

    def dispatch(self, x_RD: Tensor, plan: RoutingPlan) -> tuple[Tensor, Tensor, object]:  # pragma: no cover
        """Rows grouped by expert for ``plan``: ``(x_ND, counts_E, state)``."""
        raise NotImplementedError

    def combine(self, y_ND: Tensor, state: object) -> Tensor:  # pragma: no cover - abstract
        """The experts' outputs ``(N, *out)`` combined into tokens ``(T, *out)``."""
        raise NotImplementedError

    def run(self, x_RD: Tensor, plan: RoutingPlan, experts: Experts, *, kernel: str = "auto", fuse: bool = True):
        """``combine(experts(dispatch(x)))``; ``fuse`` is a permission a local dispatcher may use."""
        x_ND, counts_E, state = self.dispatch(x_RD, plan)
        return self.combine(experts(x_ND, counts_E, kernel=kernel), state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_DISPATCHERS: Registry[type[Dispatcher]] = Registry("dispatcher")


def register_dispatcher(name: str) -> Callable[[type[Dispatcher]], type[Dispatcher]]:
    """Class decorator that registers a dispatcher under ``name``."""
    return _DISPATCHERS.register(name)


def list_dispatchers() -> list[str]:
    """Names of all registered dispatchers, sorted."""
    return _DISPATCHERS.names()


def get_dispatcher(name: str) -> type[Dispatcher]:
    """The dispatcher class registered under ``name``; ``ValueError`` listing the valid names otherwise."""
    return _DISPATCHERS.get(name)


def build_dispatcher(name: str, **kwargs) -> Dispatcher:
    """Instantiate the dispatcher registered under ``name``."""
    return get_dispatcher(name)(**kwargs)


@register_dispatcher("local")
class LocalDispatcher(Dispatcher):
    """Dispatch and combine within one process; takes the experts' fused op when allowed (module docstring)."""

    local = True

    def dispatch(self, x_RD: Tensor, plan: RoutingPlan) -> tuple[Tensor, Tensor, object]:
        if isinstance(plan, SparsePlan):
            return gather_rows(x_RD, plan.gather_idx_N), plan.counts_E, SparseDispatchState(plan=plan)
        if isinstance(plan, DensePlan):
            G, S, E, C = plan.dispatch_GSEC.shape
            slots_EGCD = torch.einsum("gsec,gsd->egcd", plan.dispatch_GSEC.to(x_RD.dtype), x_RD.view(G, S, -1))
            counts_E = torch.full((E,), G * C, dtype=torch.long, device=x_RD.device)
            return slots_EGCD.reshape(E * G * C, -1), counts_E, DenseDispatchState(plan=plan)
        raise TypeError(f"plan must be a SparsePlan or DensePlan, got {type(plan).__name__}")

    def combine(self, y_ND: Tensor, state: object) -> Tensor:
        out_shape = tuple(y_ND.shape[1:])
        if isinstance(state, SparseDispatchState):
            plan = state.plan
            y_TO = scatter_add_weighted(
                y_ND.reshape(y_ND.shape[0], math.prod(y_ND.shape[1:])),
                plan.weight_N.to(y_ND.dtype),
                plan.token_idx_N,
                plan.num_tokens,
            )
            return y_TO.view(plan.num_tokens, *out_shape)
        if isinstance(state, DenseDispatchState):
            G, S, E, C = state.plan.combine_GSEC.shape
            out_EGCO = y_ND.reshape(E, G, C, -1)
            y_GSO = torch.einsum("gsec,egco->gso", state.plan.combine_GSEC.to(y_ND.dtype), out_EGCO)
            return y_GSO.reshape(G * S, *out_shape)
        raise TypeError(f"unknown dispatch state {type(state).__name__}")

    def run(self, x_RD: Tensor, plan: RoutingPlan, experts: Experts, *, kernel: str = "auto", fuse: bool = True):
        if fuse and isinstance(plan, SparsePlan) and experts.can_fuse:
            return experts.fused_sparse(x_RD, plan, kernel=kernel)
        return super().run(x_RD, plan, experts, kernel=kernel, fuse=fuse)
