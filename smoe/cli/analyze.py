"""``smoe analyze``: the SMoE papers' measurements of one trained run (:mod:`smoe.study.analyze`)."""

from __future__ import annotations

import argparse
import sys

from smoe.cli.common import add_device_flags, non_negative_int, positive_int

EPILOG = """examples:
  smoe analyze runs/vit                         # RC, specialisation, t-SNE, Fashion-MNIST-C, capacity curve
  smoe analyze runs/vit --baseline runs/vit-tc  # + mCE relative to another run (e.g. the token-choice router)
  smoe analyze runs/lm --probe 64               # an LM: RC, byte-class specialisation, contaminated-text loss
  smoe analyze runs/vit --corruptions gaussian_noise,fog --severities 1,3,5 --robust 200 --tsne 0

Fluctuation is measured over the run's saved checkpoints (train with --set train.ckpt_every=N). Writes
analysis.md, analysis.json and the plots to RUN/analysis (or --out).
"""


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive numbers")
    return values


def _severities(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(not 1 <= v <= 5 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: severities are integers in 1..5")
    return values


def _rates(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of rates") from None
    if any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: rates are in [0, 1]")
    return values


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "analyze",
        help="measure collapse, fluctuation, robustness, specialisation and adaptive compute of a trained run",
        description="Measure a trained run (folder or checkpoint): representation collapse, expert/label "
        "specialisation and a t-SNE per MoE layer, routing fluctuation over its checkpoints, robustness "
        "(Fashion-MNIST-C for vision, contaminated text for LMs) and, for capacity-limited vision routers, the "
        "V-MoE capacity curve with and without Batch Prioritized Routing.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", help="a run folder, a checkpoint folder, or its model.safetensors")
    p.add_argument("--out", help="output folder (default RUN/analysis)")
    p.add_argument("--probe", type=positive_int, default=256, help="probe examples (images or text windows)")
    p.add_argument("--tsne", type=non_negative_int, default=1500, help="tokens per t-SNE plot (0: none)")
    p.add_argument("--robust", type=non_negative_int, default=500, help="test images per corruption (0: none)")
    p.add_argument("--corruptions", help="comma-separated corruption names (default: the 15 of ImageNet-C)")
    p.add_argument("--severities", type=_severities, default=(1, 2, 3, 4, 5), help="e.g. 1,3,5 (default 1-5)")
    p.add_argument(
        "--capacities", type=_floats, default=(0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
        help="evaluation capacity factors of the adaptive-compute curve",
    )  # fmt: skip
    p.add_argument("--contamination", type=_rates, default=(0.0, 0.05, 0.1, 0.2), help="LM substitution rates")
    p.add_argument("--baseline", help="a run of the same task whose corruption errors normalise the mCE")
    p.add_argument("--no-fluctuation", action="store_true", help="do not route the probe set with every checkpoint")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of corruptions, contamination, subsamples")
    add_device_flags(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from smoe.study.analyze import AnalysisOptions, analyze_run  # noqa: PLC0415
    from smoe.train.device import resolve_device, set_threads  # noqa: PLC0415

    set_threads(args.threads)
    corruptions = tuple(c.strip() for c in args.corruptions.split(",") if c.strip()) if args.corruptions else None
    opts = AnalysisOptions(
        probe_examples=args.probe,
        tsne_points=args.tsne,
        robust_examples=args.robust,
        corruptions=corruptions,
        severities=args.severities,
        capacities=args.capacities,
        contamination_rates=args.contamination,
        baseline=args.baseline,
        fluctuation=not args.no_fluctuation,
        seed=args.seed,
    )
    result = analyze_run(
        args.run, args.out, opts, device=resolve_device(args.device), log=lambda m: print(m, file=sys.stderr)
    )
    from smoe.study.analyze import analysis_markdown  # noqa: PLC0415

    print(analysis_markdown(result))
    return 0
