"""How many threads a run should use when the user does not say: the idle cores, measured.

PyTorch's CPU kernels split each operation over all cores with OpenMP and wait at a barrier for the slowest
thread. When another process keeps one of the cores busy, the thread that shares that core gets half of it, and
every one of the hundreds of small parallel regions of an MoE step waits for it: on two cores with one busy, the
MoE layer ran 58x slower with two threads than on a quiet machine, and only 3.5x slower with one
(``benchmarks/README.md``, "A busy core"). :func:`auto_threads` counts the cores this process may run on that were
idle over a short window (``/proc/stat``) and returns that many, at least one, so a busy machine gets fewer threads.
"""

from __future__ import annotations

import os
import time

__all__ = ["idle_cores", "auto_threads"]


def _cpu_times() -> dict[int, tuple[int, int]]:
    """``{cpu: (idle, total)}`` jiffies from ``/proc/stat``."""
    out = {}
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                values = [int(v) for v in fields]
                idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
                out[int(name[3:])] = (idle, sum(values[:8]))
    return out


def idle_cores(window_s: float = 0.2) -> float | None:
    """Idle cores among those this process may use, averaged over ``window_s`` (``None`` where ``/proc/stat`` or
    the affinity mask is not available)."""
    try:
        cpus = os.sched_getaffinity(0)
        before = _cpu_times()
        time.sleep(window_s)
        after = _cpu_times()
    except (OSError, AttributeError, ValueError):
        return None
    idle = 0.0
    for cpu in cpus:
        if cpu in before and cpu in after:
            d_idle = after[cpu][0] - before[cpu][0]
            d_total = after[cpu][1] - before[cpu][1]
            idle += d_idle / d_total if d_total > 0 else 1.0
    return idle


def auto_threads(window_s: float = 0.2) -> int | None:
    """The number of cores that were idle (rounded, at least 1), or ``None`` when it cannot be measured."""
    idle = idle_cores(window_s)
    if idle is None:
        return None
    return max(1, int(round(idle)))
