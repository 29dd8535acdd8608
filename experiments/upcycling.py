"""Sparse Upcycling's central experiment at CPU scale (Komatsuzaki et al. 2023, Fig. 1/2; reference §8.2).

A dense LM is trained for N steps (on a warm-up + cosine schedule planned for N + M steps, with a checkpoint at
N). Then, for the same M extra steps, three arms:

  (a) dense: the dense run continued to N + M (the same run: its schedule already spans N + M);
  (b) upcycled: the step-N checkpoint upcycled (`smoe upcycle`: every other FFN -> E copies, fresh router) and
      trained to N + M on the same schedule and data stream (`smoe train --resume-from`);
  (c) MoE from scratch: the upcycled architecture trained from initialisation for N + M steps, same schedule.

Every arm is run for each seed (seeds change the initialisation, the router init and the data order); the report
gives the validation loss at N + M as mean +- 95% t-interval over seeds, the extra compute each arm spent after
step N (training FLOPs = 3 x forward FLOPs per token x tokens, and measured seconds), the paired difference
upcycled - dense per seed, and a plot of validation loss against training FLOPs.

    python experiments/upcycling.py --out runs/exp-upcycling                 # lm_small_dense, 3 seeds (docs)
    python experiments/upcycling.py --quick --out /tmp/exp                   # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time

import torch


def _t95(n: int) -> float:
    from scipy.stats import t  # noqa: PLC0415

    return float(t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan for one value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan")
    return m, _t95(len(values)) * statistics.stdev(values) / math.sqrt(len(values))


def _validation(run: pathlib.Path) -> list[tuple[int, float]]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == "validation":
            out[rec["step"]] = rec["loss"]
    return sorted(out.items())


def _flops_per_step(model_cfg, run_cfg) -> float:
    from smoe.models.presets import model_class  # noqa: PLC0415

    model = model_class(model_cfg.task)(model_cfg, device="meta")
    tokens = run_cfg.train.batch_size * (run_cfg.data.seq_len or model_cfg.seq_len)
    return 3.0 * model.flops_per_token() * tokens


def run_seed(args, seed: int, root: pathlib.Path) -> dict:
    from smoe.train.run import evaluate_run, load_run_config, resolve_run_config, train_run  # noqa: PLC0415
    from smoe.train.upcycle import upcycle_run  # noqa: PLC0415

    N, M = args.dense_steps, args.extra_steps
    over = {
        "train.steps": str(N + M),
        "train.seed": str(seed),
        "train.eval_every": str(args.eval_every),
        "train.ckpt_every": str(N),
        **dict(kv.split("=", 1) for kv in args.set),
    }
    dense_dir, up_dir, scratch_dir = root / f"dense-s{seed}", root / f"upcycled-s{seed}", root / f"scratch-s{seed}"
    times = {}

    def upcycle_at_n(out: pathlib.Path) -> None:
        ckpt = dense_dir / "checkpoints" / f"step-{N:08d}"
        upcycle_run(ckpt, out, num_experts=args.experts, top_k=args.top_k, router=args.router, layers=args.layers,
                    seed=seed)  # fmt: skip

    t0 = time.perf_counter()
    if not (dense_dir / "final.json").exists():
        train_run(resolve_run_config(args.preset, over), dense_dir, progress=False)
    times["dense"] = json.loads((dense_dir / "final.json").read_text())["train_time"]
    if not (up_dir / "final.json").exists():
        if not (up_dir / "config.json").exists():
            upcycle_at_n(up_dir)
        train_run(None, up_dir, resume=True, progress=False)
    times["upcycled"] = json.loads((up_dir / "final.json").read_text())["train_time"]
    moe_run, _ = load_run_config(up_dir)
    if not (scratch_dir / "final.json").exists():
        scratch = type(moe_run)(preset=None, model=moe_run.model, train=moe_run.train, data=moe_run.data)
        train_run(scratch, scratch_dir, progress=False)
    times["scratch"] = json.loads((scratch_dir / "final.json").read_text())["train_time"]
    dense_run, _ = load_run_config(dense_dir)
    f_dense, f_moe = _flops_per_step(dense_run.model, dense_run), _flops_per_step(moe_run.model, moe_run)
    dense_time_at_n = _train_time_at(dense_dir, N)
    curves = {
        "dense": [(s * f_dense, v) for s, v in _validation(dense_dir)],
        "upcycled": [(N * f_dense + (s - N) * f_moe, v) for s, v in _validation(up_dir) if s >= N],
        "scratch": [(s * f_moe, v) for s, v in _validation(scratch_dir)],
    }
    final = {arm: curve[-1][1] for arm, curve in curves.items()}
    extra = {
        "dense": {"flops": M * f_dense, "seconds": times["dense"] - dense_time_at_n},
        "upcycled": {"flops": M * f_moe, "seconds": times["upcycled"] - dense_time_at_n},
        "scratch": {"flops": (N + M) * f_moe - N * f_dense, "seconds": times["scratch"] - dense_time_at_n},
    }
    at_n = dict(_validation(dense_dir))[N]
    # the upcycled model right after surgery (its run's history up to N is the dense one's): rebuilt from the
    # same checkpoint with the same seed, hence the very model its training started from
    fresh_dir = root / f"upcycled-at-n-s{seed}"
    if not (fresh_dir / "config.json").exists():
        upcycle_at_n(fresh_dir)
    upcycled_at_n = evaluate_run(fresh_dir)["loss"]
    curves["upcycled"][0] = (curves["upcycled"][0][0], upcycled_at_n)
    return {
        "seed": seed,
        "final": final,
        "at_upcycling": at_n,
        "upcycled_at_upcycling": upcycled_at_n,
        "extra": extra,
        "curves": curves,
        "wall_s": time.perf_counter() - t0,  # this call (0 when every arm was already trained)
        # the three arms' training time (the upcycled run's train_time includes the dense history up to N)
        "train_s": times["dense"] + extra["upcycled"]["seconds"] + times["scratch"],
    }


def _train_time_at(run: pathlib.Path, step: int) -> float:
    total = 0.0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == "train" and rec["step"] <= step:
            total += rec["step_time"]
    return total


def _verdict(m: float, ci: float) -> str:
    if math.isnan(ci):
        return "one seed: no interval"
    if m + ci < 0:
        return "upcycled lower, beyond seed noise"
    if m - ci > 0:
        return "upcycled higher, beyond seed noise"
    return "within seed noise"


def _interp(curve: list, x: float) -> float | None:
    """Linear interpolation of a ``[(flops, loss), ...]`` curve at ``x``; None outside it."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def report(args, results: list[dict], root: pathlib.Path) -> str:
    arms = ("dense", "upcycled", "scratch")
    names = {"dense": "(a) dense, continued", "upcycled": "(b) upcycled", "scratch": "(c) MoE from scratch"}
    N, M = args.dense_steps, args.extra_steps
    lines = [
        f"Sparse upcycling, `{args.preset}`: dense for N={N} steps, then M={M} more; {len(results)} seeds "
        f"({', '.join(str(r['seed']) for r in results)}); validation loss (nats/byte) at step {N + M}, mean +- 95% "
        "t-interval over seeds.",
        "",
        f"At the upcycling point, step {N}: dense "
        + "{:.4f} +- {:.4f}".format(*mean_ci([r["at_upcycling"] for r in results]))
        + "; the upcycled model right after surgery "
        + "{:.4f} +- {:.4f}".format(*mean_ci([r["upcycled_at_upcycling"] for r in results]))
        + f" ({args.router}, top-{args.top_k} of {args.experts} copies).",
        "",
        "| arm | validation loss | extra training FLOPs after step N | extra seconds (measured) |",
        "|---|---:|---:|---:|",
    ]
    for arm in arms:
        m, ci = mean_ci([r["final"][arm] for r in results])
        fl = statistics.fmean(r["extra"][arm]["flops"] for r in results)
        sec = statistics.fmean(r["extra"][arm]["seconds"] for r in results)
        lines.append(f"| {names[arm]} | {m:.4f} +- {ci:.4f} | {fl:.3g} | {sec:.0f} |")
    for other in ("dense", "scratch"):
        diffs = [r["final"]["upcycled"] - r["final"][other] for r in results]
        m, ci = mean_ci(diffs)
        lines.append("")
        lines.append(f"Paired per seed, upcycled - {other}: {m:+.4f} +- {ci:.4f} ({_verdict(m, ci)}).")
    # the paper compares at equal compute: the upcycled curve read at the dense arm's final FLOPs
    at_dense = [_interp(r["curves"]["upcycled"], r["curves"]["dense"][-1][0]) for r in results]
    if all(v is not None for v in at_dense):
        diffs = [v - r["final"]["dense"] for v, r in zip(at_dense, results)]
        m, ci = mean_ci(diffs)
        lines += [
            "",
            "At equal training FLOPs (the upcycled curve interpolated at the dense arm's final FLOPs), upcycled - "
            f"dense: {m:+.4f} +- {ci:.4f} ({_verdict(m, ci)}).",
        ]
    # and from scratch: its curve read at the upcycled arm's total FLOPs (dense sunk cost included)
    at_up = [_interp(r["curves"]["scratch"], r["curves"]["upcycled"][-1][0]) for r in results]
    if all(v is not None for v in at_up):
        m, ci = mean_ci([r["final"]["upcycled"] - v for v, r in zip(at_up, results)])
        lines += [
            "",
            "At equal total training FLOPs (the from-scratch curve interpolated at the upcycled arm's final FLOPs, the "
            f"dense steps before N counted), upcycled - scratch: {m:+.4f} +- {ci:.4f} ({_verdict(m, ci)}).",
        ]
    lines += [
        "",
        f"Plot: {(root / 'upcycling.png').name}. Training a seed's three arms took "
        f"{statistics.fmean(r['train_s'] for r in results):.0f} s (the runs' train_time, evaluation excluded; "
        f"torch threads: {torch.get_num_threads()}).",
    ]
    return "\n".join(lines)


def plot(results: list[dict], path: pathlib.Path, N_flops: float) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax, dx) = plt.subplots(1, 2, figsize=(12.0, 4.2))
    colours = {"dense": "tab:blue", "upcycled": "tab:red", "scratch": "tab:green"}
    labels = {"dense": "(a) dense, continued", "upcycled": "(b) upcycled at N", "scratch": "(c) MoE from scratch"}
    for arm, colour in colours.items():
        xs = [x for x, _ in results[0]["curves"][arm]]
        ys = torch.tensor([[v for _, v in r["curves"][arm]] for r in results])
        mean = ys.mean(0)
        ax.plot(xs, mean, color=colour, label=labels[arm])
        if len(results) > 1:
            ax.fill_between(xs, ys.min(0).values, ys.max(0).values, color=colour, alpha=0.2)
    ax.axvline(N_flops, color="grey", ls=":", lw=1)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats per byte)")
    band = f"mean of {len(results)} seeds, band: min to max" if len(results) > 1 else "one seed"
    ax.set_title(f"Sparse upcycling vs dense continuation vs MoE from scratch\n({band})", fontsize=10)
    lo = min(min(v for _, v in r["curves"][a]) for r in results for a in colours)
    ax.set_ylim(lo - 0.05, lo + 1.0)
    ax.legend()
    ax.grid(alpha=0.3)
    # right: each seed's arms minus its own dense curve at the same FLOPs (the seeds' common plateau cancels)
    for arm in ("upcycled", "scratch"):
        for i, r in enumerate(results):
            pts = [(x, v, _interp(r["curves"]["dense"], x)) for x, v in r["curves"][arm] if x >= N_flops]
            pts = [(x, v - d) for x, v, d in pts if d is not None]
            if pts:
                label = f"{labels[arm]} - dense" if i == 0 else None
                dx.plot(*zip(*pts), color=colours[arm], alpha=0.8, lw=1.2, marker=".", label=label)
    dx.axhline(0.0, color="tab:blue", lw=1)
    dx.set_xlabel("training FLOPs, from the upcycling point")
    dx.set_ylabel("loss minus the same seed's dense loss")
    dx.set_title("Paired per seed, at equal training FLOPs (one line per seed)", fontsize=10)
    dx.legend()
    dx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="lm_small_dense")
    p.add_argument("--dense-steps", type=int, default=300)
    p.add_argument("--extra-steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--router", default="token_choice")
    p.add_argument("--layers", default="every_other")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run overrides (train.*, data.*)")
    p.add_argument("--quick", action="store_true", help="a tiny CI configuration (lm_debug dense on pydoc)")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.dense_steps, args.extra_steps, args.eval_every = "lm_debug", 10, 10, 5
        args.experts, args.seeds = 4, args.seeds[:2]
        args.set = ["moe.every=0", "data.dataset=pydoc", *args.set]
    root = pathlib.Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        print(f"seed {seed} ...", file=sys.stderr, flush=True)
        results.append(run_seed(args, seed, root))
    plot(results, root / "upcycling.png", results[0]["curves"]["upcycled"][0][0])
    text = report(args, results, root)
    (root / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    (root / "report.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
