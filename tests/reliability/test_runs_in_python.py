"""Issue 14, item 13: a run back in Python (``smoe.load_run``), ``smoe generate``, and the SMoE-VAE's image grids."""

from __future__ import annotations

import pytest
import torch

import smoe
from smoe.cli.main import main
from smoe.train.run import resolve_run_config, train_run

OVER = {"train.steps": "6", "train.batch_size": "4", "train.eval_batches": "1"}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    train_run(resolve_run_config("lm_debug", OVER), out, progress=False)
    return out


def test_load_run_returns_the_trained_model_its_config_and_tokenizer(lm_run):
    run = smoe.load_run(lm_run)
    assert isinstance(run, smoe.LoadedRun) and run.task == "lm" and run.step == 6 and not run.model.training
    assert run.config.model.dim == 16 and run.tokenizer.decode(run.tokenizer.encode("abc").tolist()) == "abc"
    # the checkpoint's weights, exactly
    from safetensors.torch import load_file

    stored = load_file(str(lm_run / "checkpoints" / "step-00000006" / "model.safetensors"))
    state = run.model.state_dict()
    assert stored and all(torch.equal(state[k], v) for k, v in stored.items())
    assert smoe.load_run(lm_run / "checkpoints" / "step-00000006" / "model.safetensors").step == 6


def test_generate_continues_the_prompt_deterministically(lm_run, capsys):
    assert main(["generate", str(lm_run), "--prompt", "ROMEO:", "--tokens", "20", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first.rstrip("\n")) >= len("ROMEO:")
    assert main(["generate", str(lm_run), "--prompt", "ROMEO:", "--tokens", "20", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first
    run = smoe.load_run(lm_run)
    ids = run.model.generate(run.tokenizer.encode("ab").unsqueeze(0), 5, top_k=1)
    assert ids.shape == (1, 7) and torch.equal(
        ids, run.model.generate(run.tokenizer.encode("ab").unsqueeze(0), 5, top_k=1)
    )
    with pytest.raises(ValueError, match="temperature"):
        run.model.generate(ids, 1, temperature=0.0)


def test_vae_runs_write_reconstructions_and_samples_and_refuse_generate(tmp_path, capsys):
    result = train_run(
        resolve_run_config("vae_debug", dict(OVER, **{"train.batch_size": "8"})), tmp_path, progress=False
    )
    for name in ("reconstructions.png", "samples.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert set(result["images"]) == {"reconstructions", "samples"}
    assert main(["generate", str(tmp_path)]) == 2
    assert "samples from language models" in capsys.readouterr().err
