"""String registry of routers: ``register_router`` / ``get_router`` / ``list_routers``.

Every registered router is built with the same keyword call
``cls(dim=..., num_experts=..., top_k=..., capacity_factor=..., **router_kwargs)`` so that the MoE layer, the
presets and the contract tests can treat them alike.
"""

from __future__ import annotations

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
    try:
        return cls(
            dim=dim,
            num_experts=num_experts,
            top_k=top_k,
            capacity_factor=capacity_factor,
            device=device,
            dtype=dtype,
            **router_kwargs,
        )
    except TypeError as e:  # an unknown router option: say which router refused it
        raise ValueError(f"router {name!r}: {e}") from None
