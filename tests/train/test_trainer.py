"""Trainer pieces: schedule, optimizer groups, evaluation, aux-loss-free bias hook, bf16, config overrides."""

from __future__ import annotations

import json
import math

import pytest
import torch

from smoe.data import DataConfig, build_data
from smoe.models import build_model, get_preset
from smoe.train import TrainConfig, Trainer, WarmupCosine, apply_dataclass_overrides, build_optimizer
from smoe.train.run import fit_model_to_data, resolve_run_config


def test_warmup_cosine_hand_worked():
    # W=2, total=6, min 0: warm-up (s+1)/2 = 0.5, 1.0; then cosine progress (s-2)/3 -> 0.5*(1+cos(pi*p))
    f = WarmupCosine(warmup_steps=2, total_steps=6, min_ratio=0.0)
    assert [round(f(s), 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.25, 0.0]
    g = WarmupCosine(warmup_steps=0, total_steps=3, min_ratio=0.1)
    assert [round(g(s), 6) for s in range(3)] == [1.0, 0.55, 0.1]  # 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55


def test_weight_decay_only_on_matrices():
    model = build_model("lm_debug")
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _trainer(preset="lm_debug", tmp_path=None, **over):
    config = get_preset(preset)
    task = config.task
    data = build_data(task, DataConfig(dataset="pydoc" if task == "lm" else "digits"), batch_size=4, seq_len=16)
    config, _ = fit_model_to_data(config, data)  # digits are 8x8: image size and patch size follow the data
    torch.manual_seed(0)
    model = build_model(config, **over)
    return Trainer(model, data, TrainConfig(steps=6, warmup_steps=2, eval_batches=2), run_dir=tmp_path, progress=False)


def test_fit_logs_every_step_and_evaluates_lm(tmp_path):
    tr = _trainer(tmp_path=tmp_path)
    result = tr.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    first, last = records[0], records[5]
    assert math.isfinite(first["loss"]) and first["lr"] == pytest.approx(tr.config.lr / 2)  # warm-up step 1 of 2
    assert last["loss"] < first["loss"]  # it learns
    # bits per byte of byte-level text = loss / ln 2
    assert result["bpb"] == pytest.approx(result["loss"] / math.log(2))
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert len(result["layers"]) == 1 and sum(result["layers"][0]["load"]) == pytest.approx(1.0)
    assert result["num_active_parameters"] < result["num_parameters"] and result["tokens_per_s"] > 0
    assert json.loads((tmp_path / "final.json").read_text())["loss"] == result["loss"]


def test_evaluation_leaves_training_rng_alone():
    tr = _trainer()
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    tr.evaluate()
    assert torch.equal(torch.rand(4), expected)


def test_vision_evaluation_reports_accuracy():
    tr = _trainer("vit_debug")
    rec = tr.evaluate()
    assert 0.0 <= rec["accuracy"] <= 1.0 and rec["split"] == "validation" and "bpb" not in rec
    assert 0.0 <= rec["drop_rate"] < 1.0  # vit_debug has a capacity factor


def test_aux_loss_free_bias_is_updated_by_the_optimizer_hook():
    tr = _trainer(moe__router_kwargs={"expert_bias": True, "balance_loss_weight": 0.0})
    assert tr.bias_hook is not None
    router = tr.model.moe_layers()[0].router
    assert torch.count_nonzero(router.expert_bias_E) == 0
    tr.train_step()
    bias = router.expert_bias_E.clone()
    # one update of +-rate per expert (0 only for an expert whose load is exactly the mean)
    assert torch.all((bias.abs() == tr.config.bias_update_rate) | (bias == 0)) and torch.count_nonzero(bias) > 0
    assert float(router.tokens_per_expert_E.sum()) == 0.0  # counters reset after the update
    assert _trainer().bias_hook is None


def test_bf16_autocast_trains():
    tr = _trainer()
    tr.config = TrainConfig(steps=2, bf16=True, eval_batches=1)
    rec = tr.train_step()
    assert math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())  # master weights stay float32


def test_dataclass_overrides_convert_and_reject():
    cfg = apply_dataclass_overrides(TrainConfig(), {"lr": "1e-3", "bf16": "true", "steps": "7"}, prefix="train")
    assert (cfg.lr, cfg.bf16, cfg.steps) == (1e-3, True, 7)
    with pytest.raises(ValueError, match="unknown config key 'train.nope'"):
        apply_dataclass_overrides(TrainConfig(), {"nope": "1"}, prefix="train")
    with pytest.raises(ValueError, match="train.steps: expected int, got 'x'"):
        apply_dataclass_overrides(TrainConfig(), {"steps": "x"}, prefix="train")
    with pytest.raises(ValueError, match="train.steps must be a positive integer"):
        apply_dataclass_overrides(TrainConfig(), {"steps": "0"}, prefix="train")
    with pytest.raises(ValueError, match="train.lr must be a finite number"):
        TrainConfig(lr=float("nan"))


def test_resolve_run_config_routes_prefixes():
    run = resolve_run_config("lm_debug", {"moe.top_k": "1", "train.steps": "3", "data.tokenizer": "bpe"})
    assert run.model.moe.top_k == 1 and run.train.steps == 3 and run.data.tokenizer == "bpe"
    with pytest.raises(ValueError, match="unknown config key 'nope'"):
        resolve_run_config("lm_debug", {"nope": "1"})
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_run_config("lm_huge", {})
