"""What each router option may be, declared next to the router and checked when the router is built.

A router class lists its constructor options in ``OPTIONS`` (merged along the class hierarchy, so
:class:`~smoe.routing.gated.GatedRouter`'s loss weights are declared once)::

    OPTIONS = {"noise_std": real(ge=0), "num_iters": integer(ge=1), "variant": choice("paper", "torchscale")}

:class:`~smoe.routing.base.Router` checks every argument given to a subclass's ``__init__`` against its spec
before the constructor runs, so a bad value is a ``ValueError`` naming the router, the option and what it accepts
(never an ``OverflowError`` at the first forward, a silent zero capacity, or a NaN). Booleans are not numbers
here: ``num_iters=True`` is refused. Constraints that tie options together (``eval_top_k <= num_experts``,
``batch_priority`` needs a capacity factor) stay in the constructors.

The specs also drive the property-based test (``tests/routing/test_options.py``): for every registered router and
every declared option, invalid values are refused naming the option and valid ones build a router that runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: the smallest temperature / entropic scale an option may take: logits divided by it stay finite in float32
#: (a cosine or a probability over 1e-6 is at most 1e6), so the losses do too
MIN_SCALE = 1e-6

__all__ = [
    "MIN_SCALE",
    "CAPACITY_FACTOR",
    "OptionSpec",
    "real",
    "integer",
    "flag",
    "choice",
    "int_tuple",
    "check_option",
    "router_options",
]


@dataclass(frozen=True)
class OptionSpec:
    """The values one option accepts.

    Attributes:
        kind: ``"real"``, ``"int"``, ``"flag"``, ``"choice"`` or ``"int_tuple"``.
        lo, hi: bounds of a number (``None``: unbounded on that side).
        lo_open, hi_open: whether the bound itself is excluded.
        none: ``None`` is accepted (an option that can be off or "use the default").
        choices: the accepted values of a choice.
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    none: bool = False
    choices: tuple = ()

    def describe(self) -> str:
        if self.kind == "flag":
            text = "True or False"
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "int_tuple":
            text = "a tuple of positive integers"
        else:
            what = "a finite number" if self.kind == "real" else "an integer"
            bounds = []
            if self.lo is not None:
                bounds.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
            if self.hi is not None:
                bounds.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
            text = what + (" " + " and ".join(bounds) if bounds else "")
        return text + (" (or None)" if self.none else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.none
        if self.kind == "flag":
            return isinstance(value, bool)
        if self.kind == "choice":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if self.kind == "int_tuple":
            return isinstance(value, tuple | list) and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
            )
        if isinstance(value, bool):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if self.kind == "real" and not (isinstance(value, int | float) and math.isfinite(value)):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True


def real(*, ge=None, gt=None, le=None, lt=None, none: bool = False) -> OptionSpec:
    """A finite number within the given bounds."""
    return OptionSpec(
        "real",
        lo=gt if gt is not None else ge,
        hi=lt if lt is not None else le,
        lo_open=gt is not None,
        hi_open=lt is not None,
        none=none,
    )


def integer(*, ge=None, le=None, none: bool = False) -> OptionSpec:
    """An integer (not a bool) within the given bounds."""
    return OptionSpec("int", lo=ge, hi=le, none=none)


def flag(*, none: bool = False) -> OptionSpec:
    """``True`` or ``False``."""
    return OptionSpec("flag", none=none)


def choice(*values, none: bool = False) -> OptionSpec:
    """One of ``values``."""
    return OptionSpec("choice", choices=tuple(values), none=none)


def int_tuple() -> OptionSpec:
    """A tuple (or list) of positive integers, possibly empty."""
    return OptionSpec("int_tuple")


#: what a capacity factor may be, wherever one is given (a router, the MoE layer, an evaluation setting)
CAPACITY_FACTOR = real(gt=0, none=True)


def router_options(cls: type) -> dict[str, OptionSpec]:
    """Every declared option of router class ``cls`` (its own ``OPTIONS`` over its bases')."""
    merged: dict[str, OptionSpec] = {}
    for klass in reversed(cls.__mro__):
        merged.update(klass.__dict__.get("OPTIONS", {}))
    return merged


def check_option(router: str, name: str, value: Any, spec: OptionSpec) -> None:
    """``ValueError`` naming ``router``, ``name`` and what it accepts, unless ``spec`` accepts ``value``."""
    if not spec.accepts(value):
        raise ValueError(f"router {router!r}: {name} must be {spec.describe()}, got {value!r}")
