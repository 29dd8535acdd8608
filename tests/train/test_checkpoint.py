"""Checkpoints: exact round trip, atomic writes, and refusal of anything that is not safetensors + JSON."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from smoe.models import build_model
from smoe.train import TrainConfig, build_optimizer, build_scheduler
from smoe.train.checkpoint import (
    atomic_write_text,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


class _Evil:
    """Unpickling this object would create ``marker`` (proof that code ran)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("lm_debug")
    cfg = TrainConfig(steps=10, warmup_steps=2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    x = torch.randint(0, 256, (2, 8))
    for _ in range(2):
        out = model(x, x)
        opt.zero_grad()
        out.total_loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_round_trip_restores_model_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = _trained()
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path / "ckpt", 2, model=model, optimizer=opt, scheduler=sched, trainer_state={"a": 1})
    expected_draw = torch.rand(3)
    assert path.name == "step-00000002" and sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]  # no temp folder left

    model2, opt2, sched2 = _trained(seed=1)  # different weights and moments
    torch.manual_seed(999)
    state = load_checkpoint(tmp_path / "ckpt", model=model2, optimizer=opt2, scheduler=sched2)
    assert state["step"] == 2 and state["trainer"] == {"a": 1}
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where it was saved
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for idx in s1["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][idx][key], s2["state"][idx][key])
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.last_epoch == 2


def test_keep_rotation_and_latest(tmp_path):
    model, opt, sched = _trained()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]
    (tmp_path / ".step-00000008.tmp-1").mkdir()  # a write interrupted by a crash is ignored
    (tmp_path / ".step-00000008.tmp-1" / "state.json").write_text("{")
    assert latest_checkpoint(tmp_path).name == "step-00000006"
    # re-saving an existing step replaces it whole
    save_checkpoint(tmp_path, 6, model=model, optimizer=opt, scheduler=sched, keep=2)
    assert latest_checkpoint(tmp_path).name == "step-00000006"


def test_pickle_disguised_as_checkpoint_is_refused_without_running_it(tmp_path):
    model, opt, sched = _trained()
    ckpt = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(str(marker)))
    (ckpt / "model.safetensors").write_bytes(payload)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_checkpoint(ckpt, model=model)
    evil = tmp_path / "weights.pt"
    torch.save({"x": _Evil(str(marker))}, evil)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_checkpoint(evil, model=model)
    assert not marker.exists()


def test_corrupt_or_foreign_checkpoints_raise_value_error(tmp_path):
    model, opt, sched = _trained()
    ckpt = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    good = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match="is damaged: model.safetensors does not match the checksum"):
        load_checkpoint(ckpt, model=model)
    (ckpt / "model.safetensors").write_bytes(good)
    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_checkpoint(ckpt, model=model)
    (ckpt / "state.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an smoe checkpoint"):
        load_checkpoint(ckpt, model=model)
    with pytest.raises(ValueError, match="no checkpoint found"):
        resolve_checkpoint(tmp_path / "empty")


def test_weights_of_another_model_are_refused(tmp_path):
    model, opt, sched = _trained()
    ckpt = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    other = build_model("lm_debug", dim=32, num_heads=2)
    with pytest.raises(ValueError, match="does not match the model"):
        load_checkpoint(ckpt, model=other)


def test_atomic_write_text_replaces_whole_file(tmp_path):
    p = tmp_path / "sub" / "config.json"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two" and [q.name for q in p.parent.iterdir()] == ["config.json"]


def test_tied_weights_are_stored_once_and_restored_tied(tmp_path):
    from safetensors.torch import load_file

    model, opt, sched = _trained()
    assert model.head.weight is model.tok_emb.weight
    ckpt = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    stored = load_file(str(ckpt / "model.safetensors"))
    assert ("head.weight" in stored) != ("tok_emb.weight" in stored)
    other = build_model("lm_debug")
    load_checkpoint(ckpt, model=other)
    assert other.head.weight is other.tok_emb.weight
    assert torch.equal(other.tok_emb.weight, model.tok_emb.weight)


def test_optimizer_state_is_keyed_by_parameter_name(tmp_path):
    from safetensors.torch import load_file

    model, opt, sched = _trained()
    ckpt = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    name = next(n for n, p in model.named_parameters() if "experts.w1_EFD" in n)
    assert torch.equal(tensors[f"optim.{name}.exp_avg"], opt.state[dict(model.named_parameters())[name]]["exp_avg"])
    assert json.loads((ckpt / "state.json").read_text())["format"] == "smoe-checkpoint-v2"


def test_a_checkpoint_of_the_first_format_still_loads(tmp_path):
    """``smoe-checkpoint-v1`` stored the optimizer state keyed by parameter position; written here as it was."""
    from safetensors.torch import save_file, save_model

    model, opt, sched = _trained()
    ckpt = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    sd = opt.state_dict()
    tensors = {"rng.torch": torch.get_rng_state()}
    tensors.update({f"optim.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()})
    save_file(tensors, str(ckpt / "optimizer.safetensors"))
    save_model(model, str(ckpt / "model.safetensors"))
    state = json.loads((ckpt / "state.json").read_text())
    state["format"] = "smoe-checkpoint-v1"
    state["optimizer"] = {"param_groups": sd["param_groups"], "scalars": {}}
    for key in ("world", "rng_ranks", "sha256"):
        state.pop(key, None)
    (ckpt / "state.json").write_text(json.dumps(state))
    model2, opt2, sched2 = _trained(seed=1)
    load_checkpoint(ckpt, model=model2, optimizer=opt2, scheduler=sched2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])
