"""``smoe train``: train one model preset on real data, with checkpoints and exact resume."""

from __future__ import annotations

import argparse
import json
import pathlib

from smoe.cli.common import add_run_flags, default_out_dir, non_negative_int, run_overrides

EPILOG = """examples:
  smoe train --preset lm_small --out runs/lm                       # Shakespeare, byte-level, default budget
  smoe train --preset lm_debug --steps 50 --set moe.top_k=1        # Switch-style top-1 routing
  smoe train --preset lm_small --set moe.router=expert_choice --set moe.group_mode=position
  smoe train --preset lm_small --data notes.txt --tokenizer bpe    # your own text file, BPE trained offline
  smoe train --preset vit_small --dataset fashion_mnist --steps 300
  smoe train --out runs/lm --resume                                # continue a killed run exactly
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a model preset on real data",
        description="Train a model preset. Everything is recorded in the output folder: config.json (resolved "
        "config), metrics.jsonl, checkpoints/ (safetensors + JSON, written atomically) and final.json.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_flags(p, default_preset="lm_small")
    p.add_argument("--eval-every", type=non_negative_int, help="evaluate every N steps (train.eval_every; 0 = end)")
    p.add_argument("--ckpt-every", type=non_negative_int, help="checkpoint every N steps (train.ckpt_every; 0 = end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.set_defaults(func=run)
    return p


def train_overrides(args: argparse.Namespace) -> dict[str, str]:
    """All dotted overrides of a ``smoe train`` command line (``--set`` plus every shortcut flag)."""
    overrides = run_overrides(args)
    if args.eval_every is not None:
        overrides["train.eval_every"] = str(args.eval_every)
    if args.ckpt_every is not None:
        overrides["train.ckpt_every"] = str(args.ckpt_every)
    return overrides


def run(args: argparse.Namespace) -> int:
    from smoe.train.run import resolve_run_config, train_run  # noqa: PLC0415 - keep `smoe --help` fast

    if args.resume and not args.out:
        raise ValueError("--resume needs --out DIR, the folder of the run to continue")
    out = pathlib.Path(args.out) if args.out else default_out_dir("train")
    overrides = train_overrides(args)
    if args.resume:
        if overrides or args.preset != "lm_small":
            print("smoe train: --resume continues the saved run; its config.json wins over other flags")
        result = train_run(None, out, resume=True, progress=not args.no_progress)  # type: ignore[arg-type]
    else:
        if (out / "config.json").exists():
            raise ValueError(f"{str(out)!r} already holds a run; pass --resume to continue it or choose another --out")
        run_cfg = resolve_run_config(args.preset, overrides)
        result = train_run(run_cfg, out, progress=not args.no_progress)
    result.pop("history", None)
    print(_summary(result))
    print(f"run folder: {out}")
    return 0


def _summary(result: dict) -> str:
    keys = ("step", "loss", "ppl", "bpb", "accuracy", "load_cv", "drop_rate", "dead_experts", "entropy", "tokens_per_s")
    parts = []
    for k in keys:
        if k in result:
            v = result[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    parts.append(f"params={result.get('num_parameters')}/{result.get('num_active_parameters')} active")
    return (
        "final validation: "
        + " ".join(parts)
        + "\n"
        + json.dumps(
            {
                "layers": [
                    {k: round(v, 4) for k, v in layer.items() if k != "load"} for layer in result.get("layers", [])
                ]
            }
        )
    )
