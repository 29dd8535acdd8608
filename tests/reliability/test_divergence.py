"""Issue 14, item 1: a run that diverges stops with an error naming the step (or skips such steps when asked),
never checkpoints non-finite weights, and shows up as "diverged at step N" at the bottom of a leaderboard."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from smoe.cli.main import main
from smoe.train import TrainingDiverged
from smoe.train.checkpoint import list_checkpoints
from smoe.train.run import resolve_run_config, train_run

DIVERGE = {"train.lr": "1e4", "train.steps": "30", "train.warmup_steps": "1", "train.batch_size": "4",
           "train.eval_batches": "1", "train.ckpt_every": "1"}  # fmt: skip


def test_a_diverging_run_stops_naming_the_step_and_keeps_only_finite_checkpoints(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"diverged at step (\d+)") as info:
        train_run(resolve_run_config("lm_debug", DIVERGE), tmp_path, progress=False)
    step = info.value.step
    assert 1 <= step < 30
    ckpts = list_checkpoints(tmp_path)
    assert len(ckpts) == step - 1  # every step before the failing one, none after
    for ckpt in ckpts:
        weights = load_file(str(ckpt / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), ckpt
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if r["split"] == "train")
    assert not (tmp_path / "final.json").exists()


def test_smoe_train_exits_with_an_error_on_divergence(tmp_path, capsys):
    args = ["train", "--preset", "lm_debug", "--lr", "1e4", "--steps", "30", "--set", "train.warmup_steps=1",
            "--batch-size", "4", "--set", "train.eval_batches=1", "--out", str(tmp_path / "run"),
            "--no-progress"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "diverged at step" in err and "train.on_nonfinite=skip" in err, err


def test_skip_mode_skips_and_counts_non_finite_steps(tmp_path):
    over = dict(DIVERGE, **{"train.on_nonfinite": "skip", "train.steps": "12", "train.ckpt_every": "0"})
    result = train_run(resolve_run_config("lm_debug", over), tmp_path, progress=False)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r["split"] == "train" and r.get("skipped")]
    assert skipped and result["skipped_steps"] == len(skipped)
    weights = load_file(str(list_checkpoints(tmp_path)[-1] / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_on_nonfinite_is_validated():
    with pytest.raises(ValueError, match="train.on_nonfinite must be one of"):
        resolve_run_config("lm_debug", {"train.on_nonfinite": "ignore"})


def test_a_diverged_router_is_listed_last_as_diverged_in_the_study(tmp_path):
    from smoe.study import StudyConfig, run_study

    cfg = StudyConfig(task="lm", quick=True, routers=["token_choice", "hash"], out_dir=tmp_path, progress=False,
                      overrides={"train.lr": "1e4", "train.warmup_steps": "1"})  # fmt: skip
    result = run_study(cfg, log=lambda s: None)
    rows = result.leaderboard
    assert all("rank" not in r for r in rows), rows  # no diverged run is ranked
    board = (tmp_path / "report.md").read_text()
    assert board.count("diverged at step") >= 2, board
