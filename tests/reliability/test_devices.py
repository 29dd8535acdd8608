"""Issue 14, items 11 and 12 (flags): ``--device`` and ``--threads`` reach the trainer; a device the machine lacks is a
clear error. The CUDA tests are marked ``gpu`` (skipped without a CUDA device)."""

from __future__ import annotations

import json

import pytest
import torch

from smoe.cli.main import main
from smoe.models import build_model
from smoe.train.device import resolve_device, set_threads
from smoe.train.run import evaluate_run, resolve_run_config, train_run

OVER = {"train.steps": "4", "train.batch_size": "4", "train.eval_batches": "1", "train.ckpt_every": "2"}


def test_device_names_resolve_or_fail_clearly():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="is not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="--threads must be a positive integer"):
        set_threads(0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_smoe_train_on_a_missing_device_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--preset", "lm_debug", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_trainer_moves_the_model_and_autocasts_on_its_device(tmp_path):
    from smoe.data import DataConfig, build_data
    from smoe.train import TrainConfig, Trainer

    data = build_data("lm", DataConfig(dataset="pydoc"), batch_size=2, seq_len=16)
    trainer = Trainer(build_model("lm_debug"), data, TrainConfig(steps=1, bf16=True), progress=False, device="cpu")
    assert trainer.device == torch.device("cpu") and trainer._autocast().device == "cpu"
    assert all(p.device.type == "cpu" for p in trainer.model.parameters())


def test_threads_flag_sets_torch_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        args = ["train", "--preset", "lm_debug", "--steps", "2", "--batch-size", "2", "--threads", "1",
                "--set", "train.eval_batches=1", "--out", str(tmp_path / "r"), "--no-progress"]  # fmt: skip
        assert main(args) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.gpu
def test_training_on_cuda_resumes_exactly_and_evaluates_like_the_cpu(tmp_path):
    import shutil

    full = train_run(resolve_run_config("lm_debug", OVER), tmp_path / "full", progress=False, device="cuda")
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "step-00000004")
    resumed = train_run(None, part, resume=True, progress=False, device="cuda")
    assert abs(resumed["loss"] - full["loss"]) < 1e-6
    records = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    on_cpu = evaluate_run(tmp_path / "full", device="cpu")
    on_gpu = evaluate_run(tmp_path / "full", device="cuda")
    assert abs(on_cpu["loss"] - on_gpu["loss"]) < 1e-4 and abs(on_gpu["loss"] - full["loss"]) < 1e-4


def test_the_default_thread_count_follows_the_idle_cores(monkeypatch):
    import smoe.train.threads as threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(threads, "auto_threads", lambda window_s=0.2: 1)  # one of two cores busy
        assert set_threads(None) == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a launcher's choice wins
        assert set_threads(None) == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(threads, "auto_threads", lambda window_s=0.2: 4)  # never more than PyTorch's default
        assert set_threads(None) == 2
    finally:
        torch.set_num_threads(before)


def test_idle_cores_are_measured_from_proc_stat():
    from smoe.train.threads import idle_cores

    idle = idle_cores(0.05)
    if idle is not None:
        import os

        assert 0.0 <= idle <= len(os.sched_getaffinity(0)) + 1e-6
