"""The one place that chooses how the engine runs.

Two choices, each with an override for tests and benchmarks:

* the *engine path*: ``"fast"`` (sorted rows, grouped GEMMs, fused scatter; the default) or ``"reference"``
  (the per-expert loop that is the specification);
* the *GEMM kernel* of the fast path: ``"grouped_mm"`` (``torch._grouped_mm``: one call for all experts) or
  ``"loop"`` (one ``mm`` per expert over contiguous row segments). ``"auto"`` uses ``loop`` on CPU (measured faster
  there, see :func:`choose_kernel`), and elsewhere ``grouped_mm`` where this torch supports it for the tensors at
  hand (float32 / bfloat16 / float16, 16-byte aligned rows) and ``loop`` otherwise (float64, odd widths, old torch).

A third, CPU-only switch is not a backend but lives with the engine's memory: the reuse of large per-step buffers
(:mod:`smoe.engine.buffers`, ``SMOE_REUSE_BUFFERS=0`` to turn it off).

Resolution order: an explicit ``backend=`` on the layer, then :func:`use_backend` / :func:`set_backend`, then the
``SMOE_BACKEND`` environment variable (``fast``, ``reference``, ``grouped_mm`` or ``loop``), then ``"auto"``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

__all__ = [
    "BACKENDS",
    "set_backend",
    "get_backend",
    "use_backend",
    "resolve_backend",
    "HAS_GROUPED_MM",
    "grouped_mm_supports",
    "choose_kernel",
]

#: accepted names: "auto" = fast path with the best GEMM kernel
BACKENDS = ("auto", "fast", "reference", "grouped_mm", "loop")

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_override: str | None = None


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


def grouped_mm_supports(x, weight) -> bool:
    """Whether ``torch._grouped_mm`` can run these operands (dtype, device, 16-byte aligned rows)."""
    if not HAS_GROUPED_MM or x.dtype not in _GROUPED_MM_DTYPES or weight.dtype != x.dtype:
        return False
    if x.device.type not in ("cpu", "cuda"):
        return False
    align = 16 // x.element_size()
    return all(n % align == 0 for n in weight.shape[1:])


def resolve_backend(explicit: str | None) -> tuple[str, str]:
    """Return ``(path, gemm)`` with path in {"fast", "reference"} and gemm in {"auto", "grouped_mm", "loop"}."""
    name = _check(explicit) if explicit is not None else get_backend()
    if name == "reference":
        return "reference", "loop"
    if name in ("grouped_mm", "loop"):
        return "fast", name
    return "fast", "auto"


def choose_kernel(kernel: str, x, *weights) -> str:
    """Resolve the fast path's GEMM kernel for these operands: ``"grouped_mm"`` or ``"loop"``.

    ``"auto"`` picks ``loop`` on CPU. Measured there (torch 2.13, MKL, 2 cores; ``benchmarks/README.md``), the
    per-expert loop with fused per-expert elementwise work beats ``torch._grouped_mm``, whose CPU kernel is itself a
    loop of ``mm`` calls but allocates fresh outputs and is slow at the weight gradient of many small groups.
    Elsewhere ``auto`` picks ``grouped_mm`` when the operands allow it (one launch for all experts, no host sync).
    An explicit ``grouped_mm`` falls back to ``loop`` for operands it cannot run (float64, unaligned widths).
    """
    if kernel == "loop":
        return "loop"
    supported = all(grouped_mm_supports(x, w) for w in weights)
    if kernel == "grouped_mm":
        return "grouped_mm" if supported else "loop"
    return "grouped_mm" if supported and x.device.type != "cpu" else "loop"
