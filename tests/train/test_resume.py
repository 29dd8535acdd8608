"""Exact resume: a run killed after a checkpoint and resumed from it repeats the uninterrupted loss curve exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from smoe.cli.main import main
from smoe.train import TrainConfig, resolve_run_config, train_run


class _Crash(Exception):
    pass


def _losses(run_dir, split="train"):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["split"] == split]


def _lm_run(**train):
    # router noise and the aux-loss-free bias make the run depend on the RNG state and on non-parameter buffers
    over = {
        "moe.router_kwargs": '{"expert_bias": true, "balance_loss_weight": 0.0, "noise": "gaussian"}',
        "data.dataset": "pydoc",
        "data.seq_len": "16",
    }
    cfg = TrainConfig(steps=10, batch_size=4, warmup_steps=3, eval_every=3, eval_batches=2, ckpt_every=4, **train)
    return resolve_run_config("lm_debug", over, train=cfg)


def test_killed_and_resumed_run_matches_uninterrupted_run(tmp_path):
    straight = train_run(_lm_run(), tmp_path / "straight", progress=False)

    def crash_at_step_6(trainer, record):
        if trainer.step == 6:  # after the checkpoint of step 4, before the one of step 8
            raise _Crash

    with pytest.raises(_Crash):
        train_run(_lm_run(), tmp_path / "killed", progress=False, on_step=crash_at_step_6)
    # a fresh set of objects (model, optimizer, data) resumes from the newest checkpoint on disk
    resumed = train_run(None, tmp_path / "killed", resume=True, progress=False)

    assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")  # every step once, equal floats
    assert [s for s, _ in _losses(tmp_path / "killed")] == list(range(1, 11))
    assert _losses(tmp_path / "killed", "validation") == _losses(tmp_path / "straight", "validation")
    assert resumed["loss"] == straight["loss"] and resumed["layers"] == straight["layers"]
    assert (tmp_path / "killed" / "checkpoints" / "step-00000010").is_dir()


def test_sigkilled_process_resumes_exactly_through_the_cli(tmp_path):
    args = [
        "train",
        "--preset",
        "lm_debug",
        "--dataset",
        "pydoc",
        "--seq-len",
        "16",
        "--steps",
        "8",
        "--batch-size",
        "4",
        "--ckpt-every",
        "3",
        "--eval-every",
        "4",
        "--no-progress",
        "--set",
        'moe.router_kwargs={"noise": "gaussian"}',
    ]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0

    # a separate Python process trains the same run and SIGKILLs itself after step 5 (checkpoint at step 3)
    script = textwrap.dedent(
        f"""
        import os, signal
        from smoe.cli.main import build_parser
        from smoe.cli.train import train_overrides
        from smoe.train import resolve_run_config, train_run
        args = build_parser().parse_args({[*args, "--out", str(tmp_path / "killed")]!r})
        run = resolve_run_config(args.preset, train_overrides(args))
        def kill(trainer, record):
            if trainer.step == 5:
                os.kill(os.getpid(), signal.SIGKILL)
        train_run(run, {str(tmp_path / "killed")!r}, progress=False, on_step=kill)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir() if not p.name.startswith(".")] == [
        "step-00000003"
    ]
    assert main(["train", "--out", str(tmp_path / "killed"), "--resume", "--no-progress"]) == 0
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")
    assert _losses(tmp_path / "killed", "validation") == _losses(tmp_path / "straight", "validation")


def test_vision_resume_across_an_epoch_boundary(tmp_path):
    # digits has 1257 training images: 16 steps of 100 cross into the second epoch after the crash
    over = {"data.dataset": "digits"}
    cfg = TrainConfig(steps=16, batch_size=100, warmup_steps=2, eval_batches=1, ckpt_every=5)
    train_run(resolve_run_config("vit_debug", over, train=cfg), tmp_path / "a", progress=False)

    def crash(trainer, record):
        if trainer.step == 12:
            raise _Crash

    with pytest.raises(_Crash):
        train_run(resolve_run_config("vit_debug", over, train=cfg), tmp_path / "b", progress=False, on_step=crash)
    train_run(None, tmp_path / "b", resume=True, progress=False)
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    assert os.path.isdir(tmp_path / "b" / "checkpoints" / "step-00000016")
