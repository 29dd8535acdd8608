"""Which GEMM kernel the stacked experts run on: ``"loop"`` (one ``mm`` per expert) or ``"grouped_mm"``.

The engine hands the experts a *requested* kernel (``"auto"``, ``"loop"`` or ``"grouped_mm"``, from the backend
name, :mod:`smoe.engine.backend`); :func:`choose_kernel` resolves it for the operands at hand. ``"auto"`` picks
``loop`` on CPU. Measured there (torch 2.13, MKL, 2 cores; ``benchmarks/README.md``), the per-expert loop with fused
per-expert elementwise work beats ``torch._grouped_mm``, whose CPU kernel is itself a loop of ``mm`` calls but
allocates fresh outputs and is slow at the weight gradient of many small groups. Elsewhere ``auto`` picks
``grouped_mm`` when the operands allow it (one launch for all experts, no host sync). An explicit ``grouped_mm``
falls back to ``loop`` for operands it cannot run (float64, unaligned widths, a torch without it).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KERNELS", "HAS_GROUPED_MM", "grouped_mm_supports", "choose_kernel"]

#: requested kernels
KERNELS = ("auto", "loop", "grouped_mm")

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_supports(x: Tensor, weight: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run these operands (dtype, device, 16-byte aligned rows)."""
    if not HAS_GROUPED_MM or x.dtype not in _GROUPED_MM_DTYPES or weight.dtype != x.dtype:
        return False
    if x.device.type not in ("cpu", "cuda"):
        return False
    align = 16 // x.element_size()
    return all(n % align == 0 for n in weight.shape[1:])


def choose_kernel(kernel: str, x: Tensor, *weights: Tensor) -> str:
    """Resolve a requested kernel for these operands: returns ``"grouped_mm"`` or ``"loop"`` (module docstring)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown GEMM kernel {kernel!r}; expected one of {KERNELS}")
    if kernel == "loop":
        return "loop"
    supported = all(grouped_mm_supports(x, w) for w in weights)
    if kernel == "grouped_mm":
        return "grouped_mm" if supported else "loop"
    return "grouped_mm" if supported and x.device.type != "cpu" else "loop"
