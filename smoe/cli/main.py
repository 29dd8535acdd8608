"""The ``smoe`` command: one console script with subcommands, each a thin module over library functions.

``main(argv) -> int`` never lets a traceback reach the user for a usage problem: a bad flag, a bad value, an unknown
preset/router/dataset/override key, missing data, or an unreadable checkpoint prints one line
``smoe <cmd>: error: ...`` on stderr and returns exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from smoe.cli import analyze, bench, evaluate, generate, ls, study, train, upcycle
from smoe.cli.common import CLIError, Parser

__all__ = ["build_parser", "main"]

EPILOG = """examples:
  smoe study --quick                       # every router on the same budget, leaderboard + report (~2 min)
  smoe study                               # the default study: 5 routers x 2 seeds, 95% intervals (~15 min)
  smoe train --preset lm_small --set moe.top_k=1 --out runs/top1
  smoe eval runs/top1 --split test
  smoe analyze runs/top1                   # collapse, fluctuation, robustness, specialisation of a run
  smoe bench --router expert_choice
  smoe ls datasets

Run `smoe <command> --help` for the worked examples of each command.
"""

SUBCOMMANDS = (study, train, upcycle, evaluate, analyze, generate, bench, ls)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the test that freezes the flag set)."""
    parser = Parser(
        prog="smoe",
        description="Sparse Mixture-of-Experts: train, evaluate, benchmark and compare routers on real data.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from smoe import __version__  # noqa: PLC0415

    parser.add_argument("--version", action="version", version=f"smoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``smoe`` command line; returns the exit status (0 ok, 2 usage or input error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CLIError as e:
        print(f"{e.prog}: error: {e} (see '{e.prog} --help')", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help / --version
        return int(e.code or 0)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    prog = f"smoe {args.command}"
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a command that relaunches itself passes on
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"{e.prog}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad user input anywhere in the library (incl. missing data, bad checkpoints)
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
