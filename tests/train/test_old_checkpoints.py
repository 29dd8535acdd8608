"""Checkpoints written before the experts/dispatcher seam (smoe at commit 4d444c5) still load and compute the same.

``tests/fixtures/pre_seam/`` holds, per case, the ``model.safetensors`` that commit wrote (``safetensors.torch
.save_model``, as the trainer does), the preset and overrides it was built from, and an input with the logits that
code computed in evaluation mode (``README.md`` there says how they were made). Loading goes through the trainer's
own loader (strict: every key must match), so a renamed parameter would fail here.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smoe.models import build_model
from smoe.train.checkpoint import load_model_weights

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "pre_seam"
CASES = sorted(p.stem for p in FIXTURES.glob("*.json"))


def test_every_fixture_is_there():
    assert set(CASES) == {"lm_debug", "lm_debug_shared_gelu", "vit_debug", "vit_debug_soft", "vae_debug"}


@pytest.mark.parametrize("case", CASES)
def test_old_checkpoint_loads_and_reproduces_its_logits(case):
    meta = json.loads((FIXTURES / f"{case}.json").read_text())
    torch.manual_seed(123)  # a different init than the one saved: the weights must come from the file
    model = build_model(meta["preset"], **meta["overrides"]).eval()
    load_model_weights(model, FIXTURES / f"{case}.safetensors")
    io = load_file(str(FIXTURES / f"{case}.io.safetensors"))
    with torch.no_grad():
        torch.manual_seed(5)  # the SMoE-VAE samples its latent in evaluation too, as the old run did
        logits = model(io["input"]).logits
    torch.testing.assert_close(logits, io["logits"], atol=1e-6, rtol=1e-5)
