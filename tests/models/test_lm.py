"""The MoE language model: causality with causal-safe routers, refusal of leaking ones, loss, input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smoe.models import build_model
from smoe.models.presets import get_preset


def _lm(**overrides):
    torch.manual_seed(0)
    base = {"depth": 2, "moe.every": 1, "seq_len": 8}
    base.update(overrides)
    model = build_model("lm_debug", **base)
    return model.eval()


def _future_changed(idx_BL: torch.Tensor, t: int) -> torch.Tensor:
    other = idx_BL.clone()
    other[:, t + 1 :] = (idx_BL[:, t + 1 :] + 1 + torch.arange(idx_BL.shape[1] - t - 1)) % 256
    return other


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # dropless token choice: every token routes alone
        {"moe.router": "expert_choice", "moe.group_mode": "position"},  # experts pick among the batch at one position
        {"moe.capacity_factor": 1.0, "moe.group_mode": "position"},  # capacity dropping, competition across the batch
    ],
    ids=["token_choice_dropless", "expert_choice_position", "token_choice_capacity_position"],
)
def test_output_at_t_does_not_depend_on_later_tokens(overrides):
    model = _lm(**overrides)
    torch.manual_seed(1)
    idx = torch.randint(0, 256, (3, 8))
    with torch.no_grad():
        logits = model(idx).logits
        for t in (0, 3, 6):
            other = model(_future_changed(idx, t)).logits
            assert torch.allclose(logits[:, : t + 1], other[:, : t + 1], atol=1e-6), f"position <= {t} changed"
            assert not torch.allclose(logits[:, t + 1 :], other[:, t + 1 :]), "later positions should change"


def test_leaking_configuration_is_refused_and_detectably_leaks_when_opted_in():
    with pytest.raises(ValueError, match="expert_choice"):
        _lm(**{"moe.router": "expert_choice", "moe.group_mode": "batch"})
    with pytest.raises(ValueError, match="leak"):
        _lm(**{"moe.capacity_factor": 1.0})  # capacity dropping over the whole batch couples positions
    # with the explicit opt-in the model builds, and the leak is real: earlier positions see later tokens
    model = _lm(**{"moe.router": "expert_choice", "moe.group_mode": "batch", "moe.allow_token_coupling": True})
    torch.manual_seed(1)
    idx = torch.randint(0, 256, (3, 8))
    with torch.no_grad():
        first, other = model(idx).logits[:, :1], model(_future_changed(idx, 0)).logits[:, :1]
    assert not torch.allclose(first, other), "expert choice over the whole batch lets later tokens change position 0"


def test_eval_capacity_that_would_leak_is_refused():
    model = _lm()
    with pytest.raises(ValueError, match="leak"):
        model.set_eval_capacity(0.5)
    model.eval()  # the refused setting was not kept
    assert all(m.router.capacity_factor is None for m in model.moe_layers())
    with pytest.raises(ValueError, match="leak"):  # refused when the model is built, not later at eval()
        build_model("lm_debug", **{"moe.eval_capacity_factor": 1.0})
    position = _lm(**{"moe.group_mode": "position"})
    position.set_eval_capacity(0.5)  # competition across the batch only: allowed
    assert all(m.router.capacity_factor == 0.5 for m in position.moe_layers())
    position.train()
    assert all(m.router.capacity_factor is None for m in position.moe_layers())


def test_loss_is_mean_cross_entropy_and_ignores_minus_100():
    model = _lm()
    idx = torch.randint(0, 256, (2, 8))
    targets = torch.randint(0, 256, (2, 8))
    targets[0, :3] = -100
    out = model(idx, targets)
    keep = targets.reshape(-1) != -100
    manual = F.cross_entropy(out.logits.reshape(16, -1)[keep], targets.reshape(-1)[keep])
    assert torch.allclose(out.loss, manual)
    assert out.logits.shape == (2, 8, 256)
    assert len(out.moe_aux) == 2 and torch.allclose(out.aux_loss, out.moe_aux[0].loss + out.moe_aux[1].loss)
    assert out.metrics["moe_tokens_processed"] == 2 * 16  # dropless: every token of both layers


def test_tied_and_untied_embeddings():
    tied = _lm()
    assert tied.head.weight is tied.tok_emb.weight
    untied = _lm(tie_embeddings=False)
    assert untied.head.weight is not untied.tok_emb.weight
    assert untied.num_parameters() == tied.num_parameters() + 256 * 16


def test_byte_level_default_and_configurable_vocab():
    assert get_preset("lm_small").vocab_size == 256
    model = _lm(vocab_size=1000)
    assert model(torch.randint(0, 1000, (1, 4))).logits.shape == (1, 4, 1000)


@pytest.mark.parametrize(
    ("idx", "match"),
    [
        (torch.zeros(2, 9, dtype=torch.long), "seq_len"),
        (torch.full((2, 4), 256), "vocab_size"),
        (torch.full((2, 4), -1), "vocab_size"),
        (torch.zeros(2, 4), "int64"),
        (torch.zeros(8, dtype=torch.long), "int64"),
    ],
)
def test_bad_inputs_raise_value_error(idx, match):
    with pytest.raises(ValueError, match=match):
        _lm()(idx)


def test_targets_shape_is_checked():
    with pytest.raises(ValueError, match="targets_BL"):
        _lm()(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))


def test_token_ids_reach_every_moe_layer():
    model = _lm()
    seen = []
    for moe in model.moe_layers():
        moe.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["token_ids"]), with_kwargs=True)
    idx = torch.randint(0, 256, (2, 5))
    model(idx)
    assert len(seen) == 2 and all(torch.equal(ids, idx) for ids in seen)


def test_eval_capacity_from_the_config_is_checked_for_leaks():
    with pytest.raises(ValueError, match="leak"):
        _lm(**{"moe.eval_capacity_factor": 1.0})
    model = _lm(**{"moe.eval_capacity_factor": 1.0, "moe.group_mode": "position"})
    assert all(m.router.capacity_factor == 1.0 for m in model.moe_layers())  # _lm() returns it in eval mode
    model.train()
    assert all(m.router.capacity_factor is None for m in model.moe_layers())
