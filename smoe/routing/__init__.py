"""Routers: who goes where. Each returns a routing plan; none touches expert weights.

Every module of this package is imported here, so that a router file registers itself just by existing
(``@register_router`` at class definition).
"""

import importlib
import pkgutil

from smoe.routing.base import Router, RouterOutput, RoutingContext
from smoe.routing.bias_balancing import register_bias_update_hook, update_expert_bias
from smoe.routing.capacity import capacity_keep_mask, compute_capacity
from smoe.routing.plan import DensePlan, RoutingPlan, SparsePlan, sparse_plan_from_topk
from smoe.routing.registry import build_router, get_router, list_routers, register_router

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Router",
    "RouterOutput",
    "RoutingContext",
    "SparsePlan",
    "DensePlan",
    "RoutingPlan",
    "sparse_plan_from_topk",
    "register_router",
    "get_router",
    "list_routers",
    "build_router",
    "compute_capacity",
    "capacity_keep_mask",
    "update_expert_bias",
    "register_bias_update_hook",
]
