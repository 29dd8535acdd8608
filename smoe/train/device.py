"""Which device a run trains on, and how many CPU threads it uses.

``smoe train/study/eval --device`` take ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (where this PyTorch has it); a
device that is not there is a ``ValueError`` naming it. On several processes, ``cuda`` means each rank's own GPU
(``cuda:LOCAL_RANK``). ``--threads N`` sets PyTorch's intra-op threads (``torch.set_num_threads``); without it,
a machine with busy cores gets as many threads as it has idle cores (:mod:`smoe.train.threads`).
"""

from __future__ import annotations

import os

import torch

__all__ = ["resolve_device", "set_threads"]


def resolve_device(name: str | torch.device | None, *, local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` for ``name`` (``None``: CPU), checked to exist.

    Raises:
        ValueError: an unknown device string, or one this machine does not have.
    """
    if name is None:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {name!r} is not a device (expected cpu, cuda, cuda:N or mps): {e}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r}: no CUDA device is available (torch.cuda.is_available() is False)")
        if device.index is None:
            index = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
            device = torch.device("cuda", index)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"--device {name!r}: MPS is not available in this PyTorch build or on this machine")
        return device
    raise ValueError(f"--device {name!r}: smoe trains on cpu, cuda or mps, not {device.type}")


def set_threads(threads: int | None, *, auto: bool = True) -> int:
    """``torch.set_num_threads(threads)``; returns the count in force.

    With ``threads=None`` and ``auto``: the idle cores (:func:`smoe.train.threads.auto_threads`) when they are
    fewer than PyTorch's default, unless ``OMP_NUM_THREADS`` is set (torchrun sets it per process), which wins.
    """
    if threads is None:
        if auto and "OMP_NUM_THREADS" not in os.environ:
            from smoe.train.threads import auto_threads  # noqa: PLC0415

            idle = auto_threads()
            if idle is not None and idle < torch.get_num_threads():
                torch.set_num_threads(idle)
        return torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {threads!r}")
    torch.set_num_threads(threads)
    return threads
