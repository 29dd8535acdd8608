"""String registry of expert types: ``register_experts`` / ``get_experts`` / ``list_experts`` / ``build_experts``.

Every registered type is built with the same keyword call ``cls(dim=..., hidden_dim=..., num_experts=...,
bias=..., device=..., dtype=..., **expert_kwargs)``, so that the MoE layer and the presets can name it. Types that
cannot be built from sizes alone (:class:`~smoe.experts.module.ModuleExperts`, which wraps modules you give it) are
passed to :class:`smoe.MoE` as instances instead.
"""

from __future__ import annotations

from collections.abc import Callable

from smoe.experts.base import Experts
from smoe.registry import Registry

__all__ = ["register_experts", "get_experts", "list_experts", "build_experts"]

_EXPERTS: Registry[type[Experts]] = Registry("expert type")


def register_experts(name: str) -> Callable[[type[Experts]], type[Experts]]:
    """Class decorator that registers an expert type under ``name``."""
    return _EXPERTS.register(name)


def list_experts() -> list[str]:
    """Names of all registered expert types, sorted."""
    return _EXPERTS.names()


def get_experts(name: str) -> type[Experts]:
    """The expert type registered under ``name``; ``ValueError`` listing the valid names otherwise."""
    return _EXPERTS.get(name)


def build_experts(
    name: str,
    *,
    dim: int,
    hidden_dim: int,
    num_experts: int,
    bias: bool = False,
    device=None,
    dtype=None,
    **expert_kwargs,
) -> Experts:
    """Instantiate the expert type ``name`` with the common arguments plus type-specific ``expert_kwargs``."""
    cls = get_experts(name)
    try:
        return cls(
            dim=dim,
            hidden_dim=hidden_dim,
            num_experts=num_experts,
            bias=bias,
            device=device,
            dtype=dtype,
            **expert_kwargs,
        )
    except TypeError as e:  # an unknown option: say which expert type refused it
        raise ValueError(f"expert type {name!r}: {e}") from None
