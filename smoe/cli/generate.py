"""``smoe generate``: sample text from a trained language-model run."""

from __future__ import annotations

import argparse

from smoe.cli.common import add_device_flags, non_negative_int, positive_float, positive_int

EPILOG = """examples:
  smoe generate runs/lm --prompt "ROMEO:" --tokens 300
  smoe generate runs/lm --prompt "To be" --temperature 0.8 --top-k 20 --seed 1
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="sample text from a trained language model",
        description="Continue a prompt with a trained LM run (its newest checkpoint, or the checkpoint given).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", help="a run folder, a checkpoint folder, or its model.safetensors")
    p.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    p.add_argument("--tokens", type=non_negative_int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--top-k", type=positive_int, help="sample among the k most likely tokens only")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the sampling (default 0)")
    add_device_flags(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415 - keep `smoe --help` fast

    from smoe.train.device import resolve_device, set_threads  # noqa: PLC0415
    from smoe.train.load import load_run  # noqa: PLC0415

    set_threads(args.threads)
    device = resolve_device(args.device)
    loaded = load_run(args.run, device=device)
    if loaded.task != "lm" or loaded.tokenizer is None:
        raise ValueError(f"{args.run!r} is a {loaded.task!r} run; smoe generate samples from language models")
    ids = loaded.tokenizer.encode(args.prompt)
    if ids.numel() == 0:
        raise ValueError("--prompt is empty after tokenisation; give at least one character")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = loaded.model.generate(
        ids.unsqueeze(0).to(device), args.tokens, temperature=args.temperature, top_k=args.top_k, generator=generator
    )
    print(loaded.tokenizer.decode(out[0].tolist()))
    return 0
