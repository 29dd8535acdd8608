"""Issue 14, item 2 (and 10): damaged checkpoint bytes are noticed on load; ``--resume`` and ``eval`` say which
checkpoint is damaged and name the newest intact one, which ``--use-intact`` takes; a pickle is named as such."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from smoe.cli.main import main
from smoe.models import build_model
from smoe.train.checkpoint import CheckpointDamaged, list_checkpoints, load_checkpoint, newest_intact_checkpoint
from smoe.train.run import resolve_run_config, train_run

OVER = {"train.steps": "6", "train.ckpt_every": "2", "train.batch_size": "4", "train.eval_batches": "1"}


@pytest.fixture()
def run_dir(tmp_path):
    train_run(resolve_run_config("lm_debug", OVER), tmp_path / "run", progress=False)
    return tmp_path / "run"


def _damage(path, offset=None):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2 if offset is None else offset
    data[mid : mid + 4096] = os.urandom(min(4096, len(data) - mid))
    path.write_bytes(bytes(data))


def test_overwritten_bytes_in_the_middle_of_the_weights_are_noticed(run_dir):
    newest = list_checkpoints(run_dir)[-1]
    _damage(newest / "model.safetensors")
    with pytest.raises(CheckpointDamaged, match="model.safetensors.*checksum") as info:
        load_checkpoint(newest, model=build_model("lm_debug"))
    assert "step-00000004" in str(info.value)  # the newest intact one is named
    assert newest_intact_checkpoint(run_dir).name == "step-00000004"


def test_eval_of_a_damaged_run_fails_and_use_intact_takes_the_newest_intact_checkpoint(run_dir, capsys):
    _damage(list_checkpoints(run_dir)[-1] / "optimizer.safetensors")  # the optimizer file is checked too
    assert main(["eval", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "step-00000004" in err and "--use-intact" in err, err
    assert main(["eval", str(run_dir), "--use-intact"]) == 0
    assert "step-00000004 step 4" in capsys.readouterr().out


def test_resume_from_a_damaged_newest_checkpoint_refuses_then_takes_the_intact_one(run_dir, capsys):
    (run_dir / "config.json").write_text(
        json.dumps(
            dict(
                json.loads((run_dir / "config.json").read_text()),
                train=dict(json.loads((run_dir / "config.json").read_text())["train"], steps=8),
            )
        )  # fmt: skip
    )
    _damage(list_checkpoints(run_dir)[-1] / "model.safetensors")
    assert main(["train", "--out", str(run_dir), "--resume", "--no-progress"]) == 2
    assert "damaged" in capsys.readouterr().err
    assert main(["train", "--out", str(run_dir), "--resume", "--use-intact", "--no-progress"]) == 0
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == list(range(1, 9))  # resumed from step 4: steps 5..8 recomputed, logged once
    train = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["split"] == "train"] == list(range(1, 9))


def test_a_pickle_in_place_of_safetensors_is_named_as_a_pickle(run_dir):
    newest = list_checkpoints(run_dir)[-1]
    (newest / "model.safetensors").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match="pickle"):
        load_checkpoint(newest, model=build_model("lm_debug"))
    torch.save({"x": torch.zeros(2)}, newest / "model.safetensors")
    with pytest.raises(ValueError, match="pickle"):
        load_checkpoint(newest, model=build_model("lm_debug"))


def test_safetensors_files_are_written_readable_like_their_json(run_dir):
    newest = list_checkpoints(run_dir)[-1]
    modes = {p.name: p.stat().st_mode & 0o777 for p in newest.iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_eval_of_a_weights_file_reports_its_checkpoint_step(run_dir, capsys):
    newest = list_checkpoints(run_dir)[-1]
    assert main(["eval", str(newest / "model.safetensors")]) == 0
    assert "step 6" in capsys.readouterr().out


def test_a_hand_edited_step_that_disagrees_with_its_folder_is_refused(run_dir):
    ckpt = list_checkpoints(run_dir)[0]
    state = json.loads((ckpt / "state.json").read_text())
    state["step"] = 120
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="step 120.*step-00000002"):
        load_checkpoint(ckpt, model=build_model("lm_debug"))
