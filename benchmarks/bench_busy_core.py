"""An MoE layer and the dense MLP on a quiet machine and with another process keeping one core busy.

One ``smoe.MoE`` layer (d=512, SwiGLU F=1024, 4096 tokens, k=2, float32, forward + backward) and the dense MLP of
the same width on ``k * 4096`` rows, timed with PyTorch's default thread count and with the count smoe chooses by
default (:func:`smoe.train.threads.auto_threads`: the idle cores). "Busy" runs ``yes > /dev/null`` pinned to the
last core of this process's affinity mask for the whole block. The configurations of a block are interleaved;
median of ``--repeats``.

    python benchmarks/bench_busy_core.py                # E=64, 3 repeats (a busy two-thread MoE step takes ~20 s)
    python benchmarks/bench_busy_core.py --quick        # d=64, E=8: a smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import torch

import smoe
from smoe.train.threads import auto_threads


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.experts, args.dim, args.hidden, args.tokens, args.repeats = 8, 64, 128, 512, 2
    return args


def _step(module, x) -> float:
    xx = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    out = module(xx)
    y = out[0] if isinstance(out, tuple) else out
    loss = y.sum() + (out[1].loss if isinstance(out, tuple) else 0.0)
    loss.backward()
    return time.perf_counter() - t0


class Hog:
    """``yes > /dev/null`` pinned to one core, for a ``with`` block."""

    def __enter__(self):
        self.proc = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(self.proc.pid, {cpus[-1]})
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
        time.sleep(0.5)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    default_threads = torch.get_num_threads()
    layer = smoe.MoE(args.dim, args.hidden, args.experts, args.top_k).train()
    dense = smoe.MLP(args.dim, args.hidden).train()
    x = torch.randn(args.tokens, args.dim)
    x_dense = torch.randn(args.tokens * args.top_k, args.dim)
    print(
        f"torch {torch.__version__}, {len(os.sched_getaffinity(0))} cores; E={args.experts}, d={args.dim}, "
        f"F={args.hidden}, {args.tokens} tokens, k={args.top_k}, fp32 fwd+bwd, median of {args.repeats}"
    )
    print("\n| machine | threads | smoe MoE ms | dense MLP ms | MoE / dense |")
    print("|---|---|---:|---:|---:|")
    for state in ("quiet", "busy"):
        ctx = Hog() if state == "busy" else None
        if ctx:
            ctx.__enter__()
        try:
            chosen = auto_threads() or default_threads
            configs = [(f"PyTorch default ({default_threads})", default_threads), (f"smoe default ({chosen})", chosen)]
            times = {name: {"moe": [], "dense": []} for name, _ in configs}
            for _name, n in configs:  # warm-up
                torch.set_num_threads(n)
                _step(layer, x), _step(dense, x_dense)
            for _ in range(args.repeats):
                for name, n in configs:
                    torch.set_num_threads(n)
                    times[name]["moe"].append(_step(layer, x))
                    times[name]["dense"].append(_step(dense, x_dense))
            for name, _ in configs:
                moe, mlp = statistics.median(times[name]["moe"]), statistics.median(times[name]["dense"])
                print(f"| {state} | {name} | {1e3 * moe:.0f} | {1e3 * mlp:.0f} | {moe / mlp:.2f} |", flush=True)
        finally:
            if ctx:
                ctx.__exit__(None, None, None)
    torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
