"""One process against two expert-parallel processes (gloo, one thread each) for one ``smoe.MoE`` layer.

Every process routes ``--tokens`` tokens of its own (the global batch grows with the ranks, as in data-parallel
training), forward and backward, float32. Reported per configuration: the step time (median over repeats, the
slowest rank), the throughput in tokens/s over all ranks, and the bytes the all-to-all exchanges move per step and
rank (rows sent in dispatch and combine, forward and backward; counts are ignored). One process runs with the
local dispatcher on one thread; two processes run the ``all_to_all`` dispatcher with half of the experts each.

    python benchmarks/bench_expert_parallel.py                 # d=512, F=1024, 4096 tokens per rank, E=8, k=2
    python benchmarks/bench_expert_parallel.py --quick         # a smoke test

On a 2-core machine the two ranks share the machine's cores with nothing else running, so the comparison is of one
core against two cores, with the exchange's cost on top (gloo over loopback TCP).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank and step")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="d=64, hidden 128, 256 tokens, E=8, 3 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.dim, args.hidden, args.tokens, args.experts, args.repeats = 64, 128, 256, [8], 3
    return args


def _steps(layer, x: torch.Tensor, repeats: int) -> list[float]:
    times = []
    for r in range(repeats + 1):  # the first is a warm-up
        layer.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_(True)
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        y, aux = layer(xx)
        (y.sum() + aux.loss).backward()
        t = time.perf_counter() - t0
        if r:
            times.append(t)
    return times


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, E: int, out: str) -> None:
    import smoe  # noqa: PLC0415 - imported in the spawned process

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=300))  # fmt: skip
    torch.manual_seed(rank)
    dispatcher = smoe.AllToAllDispatcher() if world > 1 else "local"
    layer = smoe.MoE(args.dim, args.hidden, E, args.top_k, dispatcher=dispatcher).train()
    x = torch.randn(args.tokens, args.dim)
    times = _steps(layer, x, args.repeats)
    with torch.no_grad():
        _, aux = layer(x)
    # rows of this rank's plan whose expert lives on another rank
    sent_rows = int(aux.plan.num_rows - aux.plan.counts_E.view(world, -1)[rank].sum()) if world > 1 else 0
    # rows leaving this rank: dispatch and combine, forward and backward (4 exchanges of D floats each)
    moved = 4 * sent_rows * args.dim * 4
    Path(out, f"rank{rank}.txt").write_text(f"{statistics.median(times)} {moved}")
    if world > 1:
        dist.destroy_process_group()


def run(world: int, args, E: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, f"{tmp}/init", args, E, tmp), nprocs=world, start_method="spawn")
        rows = [Path(tmp, f"rank{r}.txt").read_text().split() for r in range(world)]
    return max(float(t) for t, _ in rows), max(int(b) for _, b in rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    print(
        f"d={args.dim}, hidden={args.hidden} (SwiGLU), k={args.top_k}, {args.tokens} tokens per rank, float32, fwd+bwd,"
        f" one thread per process, median of {args.repeats}"
    )
    print("\n| E | processes | step ms (slowest rank) | tokens/s (all ranks) | speed-up | all-to-all MiB/step/rank |")
    print("|---:|---:|---:|---:|---:|---:|")
    for E in args.experts:
        base = None
        for world in (1, 2):
            t, moved = run(world, args, E)
            rate = world * args.tokens / t
            base = base or rate
            print(
                f"| {E} | {world} | {1e3 * t:.0f} | {rate:,.0f} | {rate / base:.2f} | {moved / 2**20:.1f} |", flush=True
            )


if __name__ == "__main__":
    main()
