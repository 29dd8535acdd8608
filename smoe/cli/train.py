"""``smoe train``: train one model preset on real data, with checkpoints and exact resume."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

from smoe.cli.common import (
    add_run_flags,
    default_out_dir,
    non_negative_int,
    positive_float,
    positive_int,
    run_overrides,
)

EPILOG = """examples:
  smoe train --preset lm_small --out runs/lm                       # Shakespeare, byte-level, default budget
  smoe train --preset lm_debug --steps 50 --set moe.top_k=1        # Switch-style top-1 routing
  smoe train --preset lm_small --set moe.router=expert_choice --set moe.group_mode=position
  smoe train --preset lm_small --data notes.txt --tokenizer bpe    # your own text file, BPE trained offline
  smoe train --preset vit_small --dataset fashion_mnist --steps 300
  smoe train --out runs/lm --resume                                # continue a killed run exactly
  smoe train --out runs/lm --resume --steps 400                    # train a finished run on, to 400 steps
  smoe train --preset lm_small --init-from runs/lm --out runs/ft --data notes.txt   # fine-tune trained weights
  smoe train --resume-from runs/moe                                # continue an upcycled run (smoe upcycle)
  smoe train --resume-from runs/lm/checkpoints/step-00000200 --out runs/branch   # branch a run at a checkpoint
  smoe train --preset lm_small --expert-parallel 2 --out runs/ep   # experts sharded over 2 processes
  torchrun --nproc-per-node 4 -m smoe train --expert-parallel 2 ...  # 2 expert groups of 2 ranks (DDP over 4)
  smoe train --out runs/ep --resume --nproc 1                      # resume a 2-process run in one process
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
    p.add_argument(
        "--init-from",
        metavar="RUN_OR_CHECKPOINT",
        help="start this new run from the weights of a trained run or checkpoint (same model; a fresh optimizer)",
    )
    p.add_argument(
        "--resume-from",
        metavar="RUN_OR_CHECKPOINT",
        help="continue this run (its newest checkpoint) or checkpoint: in place, or, with --out another folder, in a "
        "new run folder that starts as a copy of it up to that checkpoint (an upcycled run from `smoe upcycle`, a "
        "branch of a run)",
    )
    p.add_argument(
        "--use-intact",
        action="store_true",
        help="with --resume: if the newest checkpoint is damaged (checksum mismatch), resume from the newest "
        "intact one",
    )
    p.add_argument(
        "--expert-parallel",
        type=positive_int,
        default=1,
        metavar="P",
        help="shard the experts over groups of P processes (all-to-all); the rest is replicated with DDP",
    )
    p.add_argument(
        "--nproc",
        type=positive_int,
        metavar="N",
        help="processes to launch with torchrun on this machine (default: P of --expert-parallel); under torchrun "
        "its own --nproc-per-node decides",
    )
    p.add_argument(
        "--dist-timeout",
        type=positive_float,
        default=300.0,
        metavar="SECONDS",
        help="process-group timeout: a rank that stops answering ends the others with an error after this long",
    )
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


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def check_parallel_run(run_cfg, nproc: int, expert_parallel: int) -> None:
    """``ValueError`` for a run that cannot be split over ``nproc`` processes in groups of ``expert_parallel``."""
    if run_cfg.train.batch_size % nproc:
        raise ValueError(f"train.batch_size={run_cfg.train.batch_size} must be divisible by --nproc {nproc}")
    moe = getattr(run_cfg.model, "moe", None)
    if expert_parallel > 1 and moe is not None and moe.num_experts % expert_parallel:
        raise ValueError(f"moe.num_experts={moe.num_experts} must be divisible by --expert-parallel {expert_parallel}")


def launch(args: argparse.Namespace, nproc: int, out: pathlib.Path) -> int:
    """Run this same command in ``nproc`` processes under torchrun (one machine); returns its exit status."""
    argv = _without_nproc(args.argv)
    if not args.out:  # every rank must write into the same folder
        argv += ["--out", str(out)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "smoe", *argv]
    print(
        f"smoe train: launching {nproc} processes: torchrun --standalone --nproc-per-node={nproc} -m smoe "
        + " ".join(argv),
        flush=True,
    )
    return subprocess.call(cmd, env=env)


def run(args: argparse.Namespace) -> int:
    from smoe.train.device import resolve_device, set_threads  # noqa: PLC0415 - keep `smoe --help` fast
    from smoe.train.parallel import init_parallel, launched_by_torchrun  # noqa: PLC0415
    from smoe.train.run import resolve_run_config, train_run  # noqa: PLC0415

    if args.resume and not args.out:
        raise ValueError("--resume needs --out DIR, the folder of the run to continue")
    checkpoint = None
    if args.resume_from:
        if args.resume or args.init_from:
            raise ValueError("--resume-from continues a saved run; give it without --resume or --init-from")
        from smoe.interop.hf_upcycle import is_hf_model_dir  # noqa: PLC0415

        if is_hf_model_dir(args.resume_from):
            return _train_hf(args)
        checkpoint, args.out = _resume_from(args)
        args.resume = True
    out = pathlib.Path(args.out) if args.out else default_out_dir("train")
    overrides = train_overrides(args)
    nproc = args.nproc if args.nproc is not None else args.expert_parallel
    if not launched_by_torchrun():
        if nproc % args.expert_parallel:
            raise ValueError(f"--expert-parallel {args.expert_parallel} must divide --nproc {nproc}")
        if not args.resume and (out / "config.json").exists():
            raise ValueError(f"{str(out)!r} already holds a run; pass --resume to continue it or choose another --out")
        if nproc > 1:  # refuse what the ranks would refuse, once, before starting them
            from smoe.train.run import load_run_config  # noqa: PLC0415

            run_cfg = load_run_config(out)[0] if args.resume else resolve_run_config(args.preset, overrides)
            check_parallel_run(run_cfg, nproc, args.expert_parallel)
            return launch(args, nproc, out)
    device = resolve_device(args.device)
    set_threads(args.threads)
    if device.type == "cuda":
        import torch  # noqa: PLC0415

        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    parallel = init_parallel(args.expert_parallel, timeout_s=args.dist_timeout, backend=backend)
    if parallel.distributed and not args.out:
        raise ValueError("a run on several processes needs --out DIR (every rank writes into the same folder)")
    if args.resume:
        if args.init_from:
            raise ValueError("--init-from starts a new run; a resumed run continues from its own checkpoint")
        others = {k: v for k, v in overrides.items() if k != "train.steps"}
        if (others or args.preset != "lm_small") and parallel.is_main:
            print("smoe train: --resume continues the saved run; its config.json wins over flags other than --steps")
        result = train_run(
            None,
            out,
            resume=True,
            progress=not args.no_progress,
            parallel=parallel,  # type: ignore[arg-type]
            use_intact=args.use_intact,
            device=device,
            extend_to=args.steps,
            checkpoint=checkpoint,
        )
    else:
        exists = (out / "config.json").exists()
        parallel.barrier()  # every rank has looked before rank 0 writes config.json
        if exists:
            raise ValueError(f"{str(out)!r} already holds a run; pass --resume to continue it or choose another --out")
        run_cfg = resolve_run_config(args.preset, overrides)
        result = train_run(
            run_cfg, out, progress=not args.no_progress, parallel=parallel, device=device, init_from=args.init_from
        )
    if parallel.distributed:  # (after a failed exchange the process just exits: its group cannot shut down cleanly)
        import torch.distributed as dist  # noqa: PLC0415

        dist.destroy_process_group()
    if parallel.is_main:
        result.pop("history", None)
        print(_summary(result))
        print(f"run folder: {out}")
    return 0


def _train_hf(args: argparse.Namespace) -> int:
    """Continued pre-training of a Hugging Face causal LM folder (:func:`smoe.train.hf_lm.train_hf_lm`)."""
    from smoe.data import DataConfig  # noqa: PLC0415
    from smoe.train.config import TrainConfig, apply_dataclass_overrides  # noqa: PLC0415
    from smoe.train.device import set_threads  # noqa: PLC0415
    from smoe.train.hf_lm import train_hf_lm  # noqa: PLC0415
    from smoe.train.run import split_overrides  # noqa: PLC0415

    if args.expert_parallel != 1 or (args.nproc or 1) != 1:
        raise ValueError("a Hugging Face model folder trains in one process (no --expert-parallel / --nproc)")
    if args.device not in (None, "cpu", "auto"):
        raise ValueError("a Hugging Face model folder trains on the CPU here; --device is for smoe runs")
    set_threads(args.threads)
    model_over, train_over, data_over = split_overrides(train_overrides(args))
    if model_over:
        raise ValueError(f"--set {sorted(model_over)[0]}: a Hugging Face model's shape is its config.json's")
    defaults = TrainConfig(steps=100, batch_size=4, lr=3e-4, warmup_steps=10, eval_every=0)
    train_cfg = apply_dataclass_overrides(defaults, train_over, prefix="train")
    data_cfg = apply_dataclass_overrides(DataConfig(), data_over, prefix="data")
    result = train_hf_lm(args.resume_from, args.out, train_cfg, data_cfg, progress=not args.no_progress)
    first = result["history"][0]
    print(
        f"continued pre-training, {train_cfg.steps} steps: validation loss {first['loss']:.4f} -> "
        f"{result['loss']:.4f} (ppl {result['ppl']:.2f}), {result['tokens_per_s']:.0f} tokens/s\n"
        f"saved: {result['out']}"
    )
    return 0


def _resume_from(args: argparse.Namespace) -> tuple[pathlib.Path, str]:
    """``(checkpoint, run folder)`` that ``--resume-from`` continues: in place, or a branch copied into ``--out``."""
    from smoe.train.checkpoint import resolve_intact_checkpoint  # noqa: PLC0415
    from smoe.train.load import find_run_dir  # noqa: PLC0415
    from smoe.train.parallel import launched_by_torchrun  # noqa: PLC0415
    from smoe.train.upcycle import fork_run  # noqa: PLC0415

    ckpt = resolve_intact_checkpoint(args.resume_from, args.use_intact)
    if ckpt.is_file():
        ckpt = ckpt.parent
    run_dir = find_run_dir(ckpt)
    if not args.out or pathlib.Path(args.out).resolve() == run_dir.resolve():
        return ckpt, str(run_dir)
    if launched_by_torchrun():
        raise ValueError(
            "--resume-from with another --out copies the run first; do that in one process (smoe train "
            "--resume-from ... --out ... --nproc N launches the processes after copying)"
        )
    copied = fork_run(ckpt, args.out)
    # processes launched below continue the copy in place
    args.argv = [a if a != args.resume_from else str(copied) for a in args.argv]
    args.resume_from = str(copied)
    return copied, args.out


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
