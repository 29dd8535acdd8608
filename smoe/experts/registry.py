"""String registry of expert types: ``register_experts`` / ``get_experts`` / ``list_experts`` / ``build_experts``.

Every registered type is built with the same keyword call ``cls(dim=..., hidden_dim=..., num_experts=...,
bias=..., device=..., dtype=..., **expert_kwargs)``, so that the MoE layer and the presets can name it. Types that
cannot be built from sizes alone (:class:`~smoe.experts.module.ModuleExperts`, which wraps modules you give it) are
passed to :class:`smoe.MoE` as instances instead.
"""

from __future__ import annotations

from collections.abc import Callable

from smoe.experts.base import Experts

__all__ = ["register_experts", "get_experts", "list_experts", "build_experts"]

_EXPERTS: dict[str, type[Experts]] = {}


def register_experts(name: str) -> Callable[[type[Experts]], type[Experts]]:
    """Class decorator that registers an expert type under ``name``."""

    def deco(cls: type[Experts]) -> type[Experts]:
        if name in _EXPERTS and _EXPERTS[name] is not cls:
            raise ValueError(f"expert type {name!r} is already registered to {_EXPERTS[name].__name__}")
        _EXPERTS[name] = cls
        cls.registry_name = name
        return cls

    return deco


def list_experts() -> list[str]:
    """Names of all registered expert types, sorted."""
    return sorted(_EXPERTS)


def get_experts(name: str) -> type[Experts]:
    """The expert type registered under ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return _EXPERTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown expert type {name!r}; expected one of {list_experts()}") from None


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
