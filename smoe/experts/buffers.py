"""Reused CPU memory for the experts' large per-step buffers: weight gradients and saved activations.

Why: on CPU, blocks of more than 32 MiB come straight from ``mmap``, and the kernel faults and zeroes every page on
first touch. The stacked experts' GEMMs (:mod:`smoe.experts.fused_swiglu`, :mod:`smoe.experts.grouped`) have two
kinds of such buffers per step: the experts' weight gradients (``E`` times those of one dense MLP: 128 MiB per
projection at 64 experts, d=512, F=1024, fp32) and the ``(N, F)`` hidden activations saved for the backward.
Allocating them afresh every step cost about as much as one GEMM writing them (measured in
``benchmarks/README.md``). The CUDA caching allocator avoids this on GPUs; this module does the same for these
buffers, on CPU only.

How it stays safe: the pool keeps a reference to each storage it handed out and hands a storage out again only
when it holds the *only* reference (``torch._C._storage_Use_Count == 1``): every tensor or view still using it
(``param.grad``, a gradient returned by ``torch.autograd.grad``, a view an optimizer kept, an autograd graph not yet
run backward) counts. A training loop that calls ``zero_grad()`` (``set_to_none=True``, the default) frees
``param.grad``, so the next backward writes into the same, already-mapped memory; a loop that keeps
``param.grad`` gets a second buffer per parameter, reused from then on. The returned tensor is a fresh alias of the
storage, so autograd can still steal it as ``param.grad`` without a copy.

Bounds: buffers belong to the tensor they were requested for (the weight, for its gradient and for the
activations of its experts), held through a weak reference: when a model is deleted, its pooled memory goes with
it. A weight has at most two gradient buffers (one as ``param.grad``, one in flight when gradients are kept).
Activation sizes follow the number of routed rows; when no free buffer of the requested size exists, the free
activation buffers of other sizes are dropped first, so a run whose sizes keep changing (capacity routing) holds no
more than it uses. Under autocast the experts see a fresh cast copy of each weight every step, so nothing is
reused there.

The cost is that the memory is not returned to the system between steps (as with the CUDA caching allocator):
:func:`clear` drops the pool, and ``SMOE_REUSE_BUFFERS=0`` (read at each call) or :func:`set_enabled` turns it off.
"""

from __future__ import annotations

import os
import threading

import torch
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["empty_grad", "empty_saved", "clear", "set_enabled", "is_enabled", "pooled_bytes"]

#: smaller blocks come from malloc's own free lists (no page faults), so they are not pooled
MIN_BYTES = 8 << 20

#: the refcount query the safety rests on is a private torch API: without it, nothing is pooled
_HAS_USE_COUNT = hasattr(torch._C, "_storage_Use_Count")
_pool: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # owner tensor -> [(kind, storage), ...]
_lock = threading.Lock()
_enabled: bool | None = None


def set_enabled(flag: bool | None) -> None:
    """Force the pool on or off (``None``: follow ``SMOE_REUSE_BUFFERS``, default on). Off also clears it."""
    global _enabled
    _enabled = flag
    if flag is False:
        clear()


def is_enabled() -> bool:
    if not _HAS_USE_COUNT:
        return False
    if _enabled is not None:
        return _enabled
    return os.environ.get("SMOE_REUSE_BUFFERS", "1").strip().lower() not in ("0", "false", "no", "off")


def clear() -> None:
    """Drop every pooled storage (memory still in use elsewhere stays alive through its users)."""
    with _lock:
        _pool.clear()


def pooled_bytes() -> int:
    """Bytes held by the pool (in use or free)."""
    with _lock:
        return sum(s.nbytes() for entries in _pool.values() for _, s in entries)


def _free(storage: torch.UntypedStorage) -> bool:
    # the pool's own reference is the only one: no tensor anywhere still reads or writes this memory
    return torch._C._storage_Use_Count(storage._cdata) == 1


def _empty(shape: tuple, owner: torch.Tensor, kind: str) -> torch.Tensor:
    dtype, device = owner.dtype, owner.device
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    if device.type != "cpu" or nbytes < MIN_BYTES or not is_enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    with _lock:
        entries = _pool.get(owner)
        if entries is None:
            entries = _pool[owner] = []
        for k, storage in entries:
            if k == kind and storage.nbytes() == nbytes and _free(storage):
                return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
        if kind == "saved":
            entries[:] = [(k, s) for k, s in entries if k != kind or not _free(s)]
        out = torch.empty(shape, dtype=dtype)
        entries.append((kind, out.untyped_storage()))
        return out


def empty_grad(weight: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor shaped like ``weight``, for its gradient."""
    return _empty(tuple(weight.shape), weight, "grad")


def empty_saved(shape, weight: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous ``shape`` tensor in ``weight``'s dtype, for an activation of its experts kept for
    the backward."""
    return _empty(tuple(shape), weight, "saved")
