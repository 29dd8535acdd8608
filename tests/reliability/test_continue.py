"""Issue 14, item 14: ``--resume --steps N`` extends a finished run; ``--init-from`` starts a new run from trained
weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from smoe.cli.main import main

BASE = ["--preset", "lm_debug", "--batch-size", "4", "--set", "train.eval_batches=1", "--no-progress"]


def _train_steps(run):
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["split"] == "train"]


def test_resume_with_more_steps_extends_a_finished_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *BASE, "--steps", "6", "--out", str(run)]) == 0
    assert main(["train", "--out", str(run), "--resume", "--steps", "10", "--no-progress"]) == 0
    assert _train_steps(run) == list(range(1, 11))
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["steps"] == 10 and config["extended"] == [{"from_steps": 6, "to_steps": 10, "at_step": 6}]
    assert json.loads((run / "final.json").read_text())["step"] == 10
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "8", "--no-progress"]) == 2
    assert "must be >= the 10 steps" in capsys.readouterr().err


def test_init_from_starts_a_new_run_from_trained_weights(tmp_path, capsys):
    src = tmp_path / "src"
    assert main(["train", *BASE, "--steps", "6", "--out", str(src)]) == 0
    new = tmp_path / "new"
    assert main(["train", *BASE, "--steps", "1", "--lr", "1e-12", "--init-from", str(src), "--out", str(new)]) == 0
    a = load_file(str(src / "checkpoints" / "step-00000006" / "model.safetensors"))
    b = load_file(str(new / "checkpoints" / "step-00000001" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # one step at lr 1e-12 leaves them as loaded
    assert json.loads((new / "config.json").read_text())["fitted_to_data"]["init_from"].endswith("step-00000006")
    capsys.readouterr()
    other = ["train", "--preset", "lm_debug", "--set", "dim=32", "--steps", "1", "--init-from", str(src),
             "--out", str(tmp_path / "bad"), "--no-progress"]  # fmt: skip
    assert main(other) == 2
    assert "does not match the model" in capsys.readouterr().err


def test_init_from_and_resume_do_not_mix(tmp_path):
    from smoe.train.run import resolve_run_config, train_run

    with pytest.raises(ValueError, match="needs resume=True"):
        train_run(resolve_run_config("lm_debug"), tmp_path, extend_to=5)
