"""``smoe study``: compare routing methods on the same model, data and budget; print a leaderboard, write a report."""

from __future__ import annotations

import argparse

from smoe.cli.common import add_run_flags, positive_int, run_overrides

EPILOG = """examples:
  smoe study --quick                                   # smoke test: debug model, tiny budget (~1-2 min)
  smoe study                                           # default: lm_study on Shakespeare, 5 routers x 2 seeds (~15 min)
  smoe study --routers token_choice,expert_choice,usmoe --seeds 3
  smoe study --task vision                             # V-MoE on Fashion-MNIST, ranked by accuracy
  smoe study --steps 1000 --set moe.num_experts=16 --out runs/e16
  smoe study --data my_corpus.txt --tokenizer bpe      # your own text

Routers that make tokens compete (expert choice, USMoE, ...) run with group_mode=position in language models, so
no token sees the future. `smoe ls routers` lists what can be compared; `aux_free` is top-k token choice balanced
by the DeepSeek-V3 expert bias instead of a loss.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "study",
        help="compare routers on the same budget: leaderboard + report",
        description="Train the same small model once per router (and seed) on the same real data and budget, then "
        "print a leaderboard (quality, load balance, dropped tokens, dead experts, entropy, throughput, "
        "parameters) and write report.md with plots to the output folder (default runs/study-<timestamp>).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_flags(p, default_preset=None)
    p.add_argument("--task", choices=("lm", "vision"), default="lm", help="language modelling (default) or vision")
    p.add_argument("--routers", help="comma-separated routers/variants (default: a representative set)")
    p.add_argument(
        "--seeds", type=positive_int, default=2, help="runs per router (default 2: every number gets a 95%% interval)"
    )
    p.add_argument(
        "--no-measures",
        action="store_true",
        help="skip the papers' measurements (collapse, specialisation, fluctuation, robustness) of every run",
    )
    p.add_argument("--quick", action="store_true", help="debug preset and tiny budget, for smoke tests")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the killed study in --out: finished runs are kept, the interrupted one resumes exactly",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from smoe.study import StudyConfig, format_leaderboard, run_study  # noqa: PLC0415
    from smoe.train.device import set_threads  # noqa: PLC0415

    set_threads(args.threads)
    routers = None
    if args.routers is not None:
        routers = [r.strip() for r in args.routers.split(",") if r.strip()]
        if not routers:
            raise ValueError(f"--routers expects a comma-separated list of routers, got {args.routers!r}")
    cfg = StudyConfig(
        task=args.task,
        preset=args.preset,
        routers=routers,
        seeds=args.seeds,
        quick=args.quick,
        overrides=run_overrides(args),
        out_dir=args.out,
        progress=not args.no_progress,
        resume=args.resume,
        device=args.device,
        measure=not args.no_measures,
    )
    result = run_study(cfg)
    print()
    print(format_leaderboard(result.leaderboard, result.task))
    print()
    print(f"report: {result.files['report']}  ({result.wall_time:.0f} s)")
    failed = [r for r in result.leaderboard if "error" in r]
    return 1 if failed else 0
