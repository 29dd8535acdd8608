"""Every registered router runs inside the language model and the V-MoE, forward and backward."""

from __future__ import annotations

import pytest
import torch

import smoe
from smoe.models import build_model


@pytest.mark.parametrize("router", smoe.list_routers())
def test_router_in_causal_lm(router):
    # group_mode="position" keeps coupling routers causal-safe; dropless (no capacity factor)
    model = build_model("lm_debug", **{"moe.router": router, "moe.group_mode": "position", "moe.every": 1})
    idx = torch.randint(0, 256, (2, 8))
    out = model(idx, torch.randint(0, 256, (2, 8)))
    assert torch.isfinite(out.total_loss) and len(out.moe_aux) == 2
    out.total_loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.accounting()["flops_per_token"] > 0


@pytest.mark.parametrize("router", smoe.list_routers())
def test_router_in_vmoe(router):
    overrides = {"moe.router": router, "moe.capacity_factor": None, "moe.router_kwargs": {}}
    model = build_model("vit_debug", **overrides)
    images = torch.rand(2, 1, 28, 28)
    if smoe.get_router(router).needs_token_ids:  # images have no token ids: the router refuses them
        with pytest.raises(ValueError, match="token"):
            model(images)
        return
    out = model(images, torch.randint(0, 10, (2,)))
    assert torch.isfinite(out.total_loss) and len(out.moe_aux) == 1
    out.total_loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
