"""The engine backend: the one name that says how a routing plan is run, and where it is resolved.

A backend name resolves to three choices (:class:`EnginePath`):

* ``reference``: run the per-expert reference loop (:mod:`smoe.engine.reference`, the specification) instead of
  the dispatcher;
* ``fuse``: let the *local* dispatcher take the experts' fused gather -> experts -> combine op when the expert
  type offers one (``experts.can_fuse``); otherwise, or for a non-local dispatcher, the plan runs through the seam
  ``dispatch -> experts(x_ND, counts_E) -> combine``;
* ``kernel``: the GEMM kernel requested from the experts (``"auto"``, ``"loop"`` or ``"grouped_mm"``), which the
  experts resolve for their operands (:func:`smoe.experts.kernels.choose_kernel`).

==============  =========  ======  ==============
name            reference  fuse    kernel
==============  =========  ======  ==============
``auto``        no         yes     ``auto``        (the default)
``fast``        no         yes     ``auto``        (same as ``auto``)
``loop``        no         yes     ``loop``
``grouped_mm``  no         yes     ``grouped_mm``
``unfused``     no         no      ``auto``        (always the seam: what an expert-parallel dispatcher runs)
``reference``   yes        --      --
==============  =========  ======  ==============

Resolution order: an explicit ``backend=`` on the layer, then :func:`use_backend` / :func:`set_backend`, then the
``SMOE_BACKEND`` environment variable, then ``"auto"``. This module decides the path; the dispatcher
(:mod:`smoe.engine.dispatcher`) carries it out, and the experts pick the concrete kernel. A CPU-only switch that
is not a backend lives with the experts' memory: the reuse of large per-step buffers
(:mod:`smoe.experts.buffers`, ``SMOE_REUSE_BUFFERS=0`` to turn it off).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import NamedTuple

__all__ = ["BACKENDS", "EnginePath", "set_backend", "get_backend", "use_backend", "resolve_backend"]

#: accepted names (module docstring)
BACKENDS = ("auto", "fast", "reference", "grouped_mm", "loop", "unfused")

_override: str | None = None


class EnginePath(NamedTuple):
    """How one plan runs (module docstring)."""

    reference: bool
    fuse: bool
    kernel: str


_PATHS = {
    "auto": EnginePath(False, True, "auto"),
    "fast": EnginePath(False, True, "auto"),
    "loop": EnginePath(False, True, "loop"),
    "grouped_mm": EnginePath(False, True, "grouped_mm"),
    "unfused": EnginePath(False, False, "auto"),
    "reference": EnginePath(True, False, "loop"),
}


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown engine backend {name!r}; expected one of {BACKENDS}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide backend (``None`` restores the environment/auto default)."""
    global _override
    _override = None if name is None else _check(name)


def get_backend() -> str:
    """The process-wide backend name after the override and ``SMOE_BACKEND``."""
    if _override is not None:
        return _override
    return _check(os.environ.get("SMOE_BACKEND", "auto") or "auto")


@contextmanager
def use_backend(name: str):
    """Context manager that sets the backend and restores the previous one."""
    global _override
    previous = _override
    _override = _check(name)
    try:
        yield
    finally:
        _override = previous


def resolve_backend(explicit: str | None) -> EnginePath:
    """The :class:`EnginePath` of ``explicit`` (a backend name) or, for ``None``, of the process-wide backend."""
    return _PATHS[_check(explicit) if explicit is not None else get_backend()]
