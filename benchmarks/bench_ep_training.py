"""``lm_small`` training in one process against two processes: experts sharded (EP=2) and plain DDP (EP=1).

The same global batch in every configuration (``--batch-size`` sequences of 128 bytes of Shakespeare, split over
the ranks), the trainer of ``smoe train`` (:class:`smoe.train.Trainer` with a
:class:`~smoe.train.parallel.ParallelContext`), one thread per process, float32. Reported per configuration: the
median step time over the steps after the trainer's warm-up (the trainer's own throughput figure: global tokens per
second), and the bytes each rank's all-to-all exchanges send to the other rank per step, counted by wrapping
``torch.distributed.all_to_all_single`` (rows of the forward and backward exchanges, not the per-expert counts).
The configurations are run in turn, ``--rounds`` times, so that a slow period of the machine hits all of them.

    python benchmarks/bench_ep_training.py                    # 30 steps, 3 rounds
    python benchmarks/bench_ep_training.py --quick            # lm_debug, a smoke test

On a 2-core machine two processes use both cores where one process uses one; the comparison is of one core against
two, with the exchanges and DDP's all-reduce on top (gloo over loopback TCP).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CONFIGS = [("1 process", 1, 1), ("2 processes, EP=2 (experts sharded)", 2, 2), ("2 processes, EP=1 (DDP)", 2, 1)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="lm_small")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="lm_debug, 6 steps, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.batch_size, args.rounds = "lm_debug", 6, 8, 1
    return args


def _worker(rank: int, world: int, ep: int, init: str, args: argparse.Namespace, out: str) -> None:
    from smoe.train.parallel import init_parallel  # noqa: PLC0415 - imported in the spawned process
    from smoe.train.run import resolve_run_config, train_run  # noqa: PLC0415

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=300))  # fmt: skip
    sent = [0]
    if world > 1:
        original = dist.all_to_all_single

        def counting(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
            if input_split_sizes is not None and input.dim() == 2:  # rows (not the counts)
                others = sum(n for r, n in enumerate(input_split_sizes) if r != rank)
                sent[0] += others * input.shape[1] * input.element_size()
            return original(output, input, output_split_sizes, input_split_sizes, **kw)

        dist.all_to_all_single = counting
    ctx = init_parallel(ep, timeout_s=300)
    overrides = {"train.steps": str(args.steps), "train.batch_size": str(args.batch_size), "train.eval_batches": "1"}
    result = train_run(resolve_run_config(args.preset, overrides), None, progress=False, parallel=ctx)
    steps = [r["step_time"] for r in result["history"] if r["split"] == "train"][3:]
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"step_s": statistics.median(steps), "tokens_per_s": result["tokens_per_s"], "sent": sent[0]})
    )
    if world > 1:
        dist.destroy_process_group()


def run(world: int, ep: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, ep, f"{tmp}/init", args, tmp), nprocs=world, start_method="spawn")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    return {
        "step_s": max(r["step_s"] for r in ranks),
        "tokens_per_s": min(r["tokens_per_s"] for r in ranks),
        "sent_per_step": max(r["sent"] for r in ranks) / args.steps,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    print(
        f"{args.preset}, global batch {args.batch_size}, {args.steps} steps (median step after the first 3), "
        f"float32, one thread per process, {args.rounds} round(s)"
    )
    results: dict[str, list[dict]] = {name: [] for name, _, _ in CONFIGS}
    for _ in range(args.rounds):
        for name, world, ep in CONFIGS:
            results[name].append(run(world, ep, args))
    base = statistics.median(r["tokens_per_s"] for r in results[CONFIGS[0][0]])
    print("\n| configuration | step ms | tokens/s | speed-up | all-to-all MiB/step/rank |")
    print("|---|---:|---:|---:|---:|")
    for name, _, _ in CONFIGS:
        rs = results[name]
        step = statistics.median(r["step_s"] for r in rs)
        rate = statistics.median(r["tokens_per_s"] for r in rs)
        sent = statistics.median(r["sent_per_step"] for r in rs)
        spread = f" ({min(r['tokens_per_s'] for r in rs):,.0f}-{max(r['tokens_per_s'] for r in rs):,.0f})"
        print(f"| {name} | {1e3 * step:.0f} | {rate:,.0f}{spread} | {rate / base:.2f} | {sent / 2**20:.2f} |")


if __name__ == "__main__":
    main()
