"""Shared pieces of the ``smoe`` command: one-line usage errors, ``--set KEY=VALUE`` parsing, common run flags."""

from __future__ import annotations

import argparse
import datetime
import pathlib

__all__ = [
    "CLIError",
    "Parser",
    "parse_sets",
    "add_run_flags",
    "run_overrides",
    "default_out_dir",
    "positive_int",
    "non_negative_int",
    "positive_float",
]


class CLIError(Exception):
    """A usage error: printed as one line ``smoe <cmd>: error: ...`` and exit status 2."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors raise :class:`CLIError` instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(self.prog, message)


def _checked(kind, test, expected: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}")
        return value

    parse.__name__ = expected
    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _checked(float, lambda v: v > 0, "a positive number")


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """``["moe.top_k=1", "train.lr=1e-3"]`` -> ``{"moe.top_k": "1", "train.lr": "1e-3"}``.

    Raises:
        ValueError: an item without ``=`` or with an empty key.
    """
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE (e.g. moe.top_k=1), got {item!r}")
        out[key.strip()] = value.strip()
    return out


def add_run_flags(p: argparse.ArgumentParser, *, default_preset: str | None) -> None:
    """Flags shared by ``train`` and ``study``: preset, overrides, budget, data, output."""
    p.add_argument("--preset", default=default_preset, help="model preset (see `smoe ls presets`)")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        metavar="KEY=VALUE",
        help="dotted override, repeatable: model fields (moe.top_k=1, dim=128), train.* or data.*",
    )
    p.add_argument("--steps", type=positive_int, help="optimizer steps (train.steps)")
    p.add_argument("--batch-size", type=positive_int, help="sequences or images per step (train.batch_size)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (train.lr)")
    p.add_argument("--seed", type=non_negative_int, help="seed of init, data order and noise (train.seed)")
    p.add_argument("--dataset", help="registered dataset (see `smoe ls datasets`); default: the task's best installed")
    p.add_argument("--data", metavar="PATH", help="a local UTF-8 text file (or hf:NAME[:CONFIG]) for language models")
    p.add_argument("--seq-len", type=positive_int, help="LM window length (data.seq_len; default: the model context)")
    p.add_argument("--tokenizer", choices=("byte", "bpe"), help="LM tokenizer (data.tokenizer, default byte)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (router math stays float32)")
    p.add_argument("--out", metavar="DIR", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_flags(p)


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads`` (train, study, eval)."""
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument(
        "--threads", type=positive_int, help="CPU threads for PyTorch (default: PyTorch's, or the idle cores if fewer)"
    )


def run_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The dotted overrides of ``--set`` plus those of the shortcut flags (shortcuts win)."""
    over = parse_sets(args.sets)
    shortcuts = {
        "train.steps": args.steps,
        "train.batch_size": args.batch_size,
        "train.lr": args.lr,
        "train.seed": args.seed,
        "data.dataset": args.dataset,
        "data.path": args.data,
        "data.seq_len": args.seq_len,
        "data.tokenizer": args.tokenizer,
        "train.bf16": True if args.bf16 else None,
    }
    over.update({k: str(v) for k, v in shortcuts.items() if v is not None})
    return over


def default_out_dir(kind: str) -> pathlib.Path:
    """``runs/<kind>-<YYYYmmdd-HHMMSS>``."""
    return pathlib.Path("runs") / f"{kind}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
