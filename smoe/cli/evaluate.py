"""``smoe eval``: evaluate a trained run or checkpoint on its validation or test split."""

from __future__ import annotations

import argparse
import json

from smoe.cli.common import add_device_flags, non_negative_int

EPILOG = """examples:
  smoe eval runs/lm                                   # newest checkpoint of a run, validation split
  smoe eval runs/lm/checkpoints/step-00000200 --split test
  smoe eval runs/lm --batches 0 --json                # the whole split, machine-readable output

Checkpoints are read as safetensors + JSON only; a pickle file is refused, never unpickled.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a trained run or checkpoint",
        description="Evaluate a run folder (its newest checkpoint) or one checkpoint folder: task metrics "
        "(loss, perplexity and bits per byte for LMs, accuracy for vision) and routing diagnostics per MoE layer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a run folder, a checkpoint folder, or its model.safetensors")
    p.add_argument("--split", choices=("validation", "test"), default="validation", help="split to evaluate")
    p.add_argument("--batches", type=non_negative_int, help="evaluation batches (0 = whole split; default: the run's)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    add_device_flags(p)
    p.add_argument(
        "--use-intact",
        action="store_true",
        help="if the checkpoint is damaged (checksum mismatch), evaluate the newest intact one of its run",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from smoe.train.device import resolve_device, set_threads  # noqa: PLC0415
    from smoe.train.run import evaluate_run  # noqa: PLC0415

    set_threads(args.threads)
    result = evaluate_run(
        args.checkpoint,
        split=args.split,
        max_batches=args.batches,
        use_intact=args.use_intact,
        device=resolve_device(args.device),
    )
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    keys = ("loss", "ppl", "bpb", "accuracy", "load_cv", "max_load", "drop_rate", "dead_experts", "entropy")
    line = " ".join(f"{k}={result[k]:.4g}" for k in keys if k in result)
    print(f"{result['checkpoint']} step {result['step']} [{args.split}]: {line}")
    for i, layer in enumerate(result["layers"]):
        print(
            f"  moe layer {i}: load_cv={layer['load_cv']:.3f} max_load={layer['max_load']:.2f} "
            f"dead={int(layer['dead_experts'])} drop={layer['drop_rate']:.3f} entropy={layer['entropy']:.3f}"
        )
    return 0
