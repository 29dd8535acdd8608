"""The engine: moves tokens to experts and back for any routing plan. It never knows which router ran."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from smoe.engine.backend import BACKENDS, get_backend, resolve_backend, set_backend, use_backend
from smoe.engine.fast import run_dense_fast, run_sparse_fast
from smoe.engine.reference import run_dense_reference, run_sparse_reference
from smoe.routing.plan import DensePlan, RoutingPlan, SparsePlan

if TYPE_CHECKING:  # experts are parameters only; importing them here would be circular
    from smoe.layers.experts import Experts

__all__ = [
    "run_plan",
    "BACKENDS",
    "set_backend",
    "get_backend",
    "use_backend",
    "run_sparse_fast",
    "run_dense_fast",
    "run_sparse_reference",
    "run_dense_reference",
]


def run_plan(x_RD: Tensor, plan: RoutingPlan, experts: Experts, backend: str | None = None) -> Tensor:
    """Run ``experts`` on ``x_RD`` as ``plan`` says and return the combined ``(T, D)`` output.

    Args:
        x_RD: engine input rows (the layer's tokens, or the router's ``inputs_RD``).
        plan: a :class:`SparsePlan` or :class:`DensePlan`.
        experts: the stacked expert weights.
        backend: engine backend override (see :mod:`smoe.engine.backend`).
    """
    path, kernel = resolve_backend(backend)
    device_type = x_RD.device.type
    if torch.is_autocast_enabled(device_type):
        # the engine's GEMMs are not all autocast ops (torch._grouped_mm is not): cast explicitly, once
        compute_dtype = torch.get_autocast_dtype(device_type)
        if x_RD.dtype != compute_dtype:
            x_RD = x_RD.to(compute_dtype)
            experts = experts.cast(compute_dtype)
    if isinstance(plan, SparsePlan):
        if path == "reference":
            return run_sparse_reference(x_RD, plan, experts)
        return run_sparse_fast(x_RD, plan, experts, kernel)
    if isinstance(plan, DensePlan):
        if path == "reference":
            return run_dense_reference(x_RD, plan, experts)
        return run_dense_fast(x_RD, plan, experts, kernel)
    raise TypeError(f"plan must be a SparsePlan or DensePlan, got {type(plan).__name__}")
