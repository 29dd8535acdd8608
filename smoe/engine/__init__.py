"""The engine: moves tokens to experts and back for any routing plan. It never knows which router ran, and it
never computes an expert: the experts (:mod:`smoe.experts`) run themselves on the rows it hands them.

* :mod:`~smoe.engine.dispatcher` -- ``dispatch(x, plan) -> (x_ND, counts_E, state)`` / ``combine(y_ND, state)``,
  the seam between moving tokens and computing experts; :class:`LocalDispatcher` within one process;
* :mod:`~smoe.engine.all_to_all` -- expert parallelism: experts sharded over a process group;
* :mod:`~smoe.engine.reference` -- the specification: per-expert loops over the plan;
* :mod:`~smoe.engine.backend` -- the backend name that picks between them (and allows the fused path);
* :func:`run_plan` -- what the MoE layer calls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.engine.all_to_all import AllToAllDispatcher, shard_expert_state
from smoe.engine.backend import BACKENDS, EnginePath, get_backend, resolve_backend, set_backend, use_backend
from smoe.engine.dispatcher import (
    Dispatcher,
    LocalDispatcher,
    build_dispatcher,
    get_dispatcher,
    list_dispatchers,
    register_dispatcher,
)
from smoe.engine.reference import run_dense_reference, run_sparse_reference
from smoe.experts.base import Experts
from smoe.routing.plan import DensePlan, RoutingPlan, SparsePlan

__all__ = [
    "run_plan",
    "BACKENDS",
    "EnginePath",
    "set_backend",
    "get_backend",
    "use_backend",
    "resolve_backend",
    "Dispatcher",
    "LocalDispatcher",
    "AllToAllDispatcher",
    "shard_expert_state",
    "register_dispatcher",
    "get_dispatcher",
    "list_dispatchers",
    "build_dispatcher",
    "run_sparse_reference",
    "run_dense_reference",
]

_LOCAL = LocalDispatcher()


def run_plan(
    x_RD: Tensor,
    plan: RoutingPlan,
    experts: Experts,
    backend: str | None = None,
    dispatcher: Dispatcher | None = None,
) -> Tensor:
    """Run ``experts`` on ``x_RD`` as ``plan`` says and return the combined ``(T, *out)`` output.

    ``dispatcher.dispatch -> experts -> dispatcher.combine`` (or the experts' fused op, where the local dispatcher
    may take it), or the reference loop, as the backend says (:mod:`smoe.engine.backend`).

    Args:
        x_RD: engine input rows (the layer's tokens, or the router's ``inputs_RD``).
        plan: a :class:`~smoe.routing.plan.SparsePlan` or :class:`~smoe.routing.plan.DensePlan`.
        experts: the experts (:class:`smoe.experts.Experts`).
        backend: engine backend override (``None``: the process default).
        dispatcher: how tokens move (``None``: within this process).
    """
    path = resolve_backend(backend)
    device_type = x_RD.device.type
    if torch.is_autocast_enabled(device_type):
        # the experts' GEMMs are not all autocast ops (torch._grouped_mm is not): the rows are cast once here, the
        # experts cast their weights to match (smoe.experts.mlp.MLPExperts.weights)
        x_RD = x_RD.to(torch.get_autocast_dtype(device_type))
    if not isinstance(plan, SparsePlan | DensePlan):
        raise TypeError(f"plan must be a SparsePlan or DensePlan, got {type(plan).__name__}")
    if path.reference:
        if dispatcher is not None and not dispatcher.local:
            raise ValueError(
                f"backend='reference' runs every expert in this process; the dispatcher {dispatcher!r} shards them "
                "(use backend='auto' or 'unfused')"
            )
        run = run_sparse_reference if isinstance(plan, SparsePlan) else run_dense_reference
        return run(x_RD, plan, experts)
    return (dispatcher or _LOCAL).run(x_RD, plan, experts, kernel=path.kernel, fuse=path.fuse)
