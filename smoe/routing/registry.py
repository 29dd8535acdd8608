"""String registry of routers: ``register_router`` / ``get_router`` / ``list_routers``.

Every registered router is built with the same keyword call
``cls(dim=..., num_experts=..., top_k=..., capacity_factor=..., **router_kwargs)`` so that the MoE layer, the
presets and the contract tests can treat them alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from smoe.registry import Registry
from smoe.routing.base import Router

__all__ = ["register_router", "get_router", "list_routers", "build_router", "router_summary"]

_ROUTERS: Registry[type[Router]] = Registry("router")


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator that registers a router under ``name``."""
    return _ROUTERS.register(name)


def list_routers() -> list[str]:
    """Names of all registered routers, sorted."""
    return _ROUTERS.names()


def get_router(name: str) -> type[Router]:
    """The router class registered under ``name``; ``ValueError`` listing the valid names otherwise."""
    return _ROUTERS.get(name)


def router_summary(name: str) -> str:
    """One line describing the router ``name``: the first line of its class docstring, without a trailing pointer
    to the module docstring (``smoe ls routers``, the study report)."""
    doc = (get_router(name).__doc__ or "").strip()
    if not doc:
        return f"registered router {name!r}"
    line = doc.splitlines()[0].rstrip(".")
    for tail in (" (module docstring)", " (see module docstring)", " (see the module docstring)"):
        line = line.replace(tail, "")
    return line.replace("(module docstring): ", ": ").replace(" (module docstring)", "")


def build_router(
    name: str,
    *,
    dim: int,
    num_experts: int,
    top_k: int,
    capacity_factor: float | None = None,
    device=None,
    dtype=None,
    **router_kwargs,
) -> Router:
    """Instantiate the router ``name`` with the common arguments plus router-specific ``router_kwargs``."""
    cls = get_router(name)
    known = router_parameters(cls)
    unknown = sorted(set(router_kwargs) - known)
    if unknown:  # say which option, and what the router has, before anything runs
        options = ", ".join(sorted(known - {"dim", "num_experts", "top_k", "capacity_factor", "device", "dtype"}))
        raise ValueError(f"router {name!r} has no option {unknown[0]!r}; its options: {options or 'none'}")
    return cls(
        dim=dim,
        num_experts=num_experts,
        top_k=top_k,
        capacity_factor=capacity_factor,
        device=device,
        dtype=dtype,
        **router_kwargs,
    )


def router_parameters(cls: type) -> set[str]:
    """Every keyword the constructor of router class ``cls`` takes (its own and those it passes to its bases)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object or not issubclass(klass, Router):
            continue
        init = getattr(init, "__wrapped__", init)
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break  # it passes nothing further up
    return names
