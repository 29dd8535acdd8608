"""Spawning a small world of processes inside a test, with a bounded wait (a hang fails the test, not CI)."""

from __future__ import annotations

import time

import pytest
import torch.multiprocessing as mp

WORLD = 2


def run_ranks(target, args: tuple, timeout_s: float, world: int = WORLD) -> list[int | None]:
    """Start one process per rank (``target(rank, *args)``) and wait at most ``timeout_s`` in all; returns the exit
    codes (``None`` for a rank still running at the deadline, which is then killed)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


def run_world(fn, args: tuple, timeout_s: float = 240.0, world: int = WORLD) -> None:
    """Run ``fn(rank, *args)`` on every rank (:func:`run_ranks`); fail unless every rank ends cleanly in time."""
    codes = run_ranks(fn, args, timeout_s, world)
    if codes != [0] * world:
        pytest.fail(f"the {world}-process world ended with exit codes {codes} (None: running at {timeout_s:.0f} s)")
