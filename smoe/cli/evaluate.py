"""``smoe eval``: evaluate a trained run or checkpoint on its validation or test split."""

from __future__ import annotations

import argparse
import json

from smoe.cli.common import add_device_flags, non_negative_int

EPILOG = """examples:
  smoe eval runs/lm                                   # newest checkpoint of a run, validation split
  smoe eval runs/lm/checkpoints/step-00000200 --split test
  smoe eval runs/lm --batches 0 --json                # the whole split, machine-readable output
  smoe eval runs/smol-moe --data-set shakespeare      # a Hugging Face causal LM folder: loss on a text split
  smoe eval runs/minilm-moe                           # a Hugging Face encoder folder: Lee STS Spearman

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
    p.add_argument(
        "--data-set",
        metavar="NAME",
        help="Hugging Face causal LM folders: the text corpus to evaluate on (default shakespeare)",
    )
    p.add_argument("--seq-len", type=non_negative_int, default=128, help="Hugging Face causal LMs: window length")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from smoe.train.device import resolve_device, set_threads  # noqa: PLC0415
    from smoe.train.run import evaluate_run  # noqa: PLC0415

    set_threads(args.threads)
    from smoe.interop.hf_upcycle import is_hf_model_dir  # noqa: PLC0415

    if is_hf_model_dir(args.checkpoint):
        return _evaluate_hf(args)
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
    return _print(result, args)


def _evaluate_hf(args: argparse.Namespace) -> int:
    """A Hugging Face model folder: loss on a text split (causal LM) or the Lee STS correlation (encoder)."""
    from smoe.data import DataConfig  # noqa: PLC0415
    from smoe.interop.hf_upcycle import load_pretrained  # noqa: PLC0415
    from smoe.train.hf_lm import EVAL_BATCH_SIZE, evaluate_hf_lm, hf_lm_data, sts_spearman  # noqa: PLC0415

    model, tokenizer = load_pretrained(args.checkpoint)
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint!r} holds no tokenizer to evaluate with")
    if (
        hasattr(model, "generate")
        and getattr(model.config, "is_decoder", True)
        and "ForCausalLM" in type(model).__name__
    ):
        data = hf_lm_data(
            tokenizer, DataConfig(dataset=args.data_set), batch_size=EVAL_BATCH_SIZE, seq_len=args.seq_len or 128
        )
        result = evaluate_hf_lm(model, data, args.split, None if args.batches == 0 else (args.batches or 8))
    else:
        result = {"lee_sts_spearman": sts_spearman(model, tokenizer)}
    result["checkpoint"] = args.checkpoint
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{args.checkpoint}: " + " ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)))
    return 0


def _print(result: dict, args: argparse.Namespace) -> int:
    keys = ("loss", "ppl", "bpb", "accuracy", "load_cv", "max_load", "drop_rate", "dead_experts", "entropy")
    line = " ".join(f"{k}={result[k]:.4g}" for k in keys if k in result)
    print(f"{result['checkpoint']} step {result['step']} [{args.split}]: {line}")
    for i, layer in enumerate(result["layers"]):
        print(
            f"  moe layer {i}: load_cv={layer['load_cv']:.3f} max_load={layer['max_load']:.2f} "
            f"dead={int(layer['dead_experts'])} drop={layer['drop_rate']:.3f} entropy={layer['entropy']:.3f}"
        )
    return 0
