"""V-MoE: routing groups across images, evaluation capacity with Batch Prioritized Routing, tokens processed."""

from __future__ import annotations

import pytest
import torch

from smoe.models import build_model


def _vmoe(**overrides):
    base = {"moe.every": 1, "moe.images_per_group": 4, "moe.capacity_factor": 1.05}
    base.update(overrides)
    torch.manual_seed(0)
    return build_model("vit_debug", **base)


def test_groups_hold_whole_images():
    model = _vmoe()
    # 28x28 with patch 7: 16 patches + the class token = 17 tokens; 4 images per group
    assert all(m.group_size == 4 * 17 for m in model.moe_layers())
    with pytest.raises(ValueError, match="images_per_group=4"):
        model(torch.randn(6, 1, 28, 28))
    mean_pool = _vmoe(pool="mean")
    assert mean_pool.tokens_per_image == 16 and mean_pool.moe_layers()[0].group_size == 64


def test_bpr_with_capacity_below_one_at_eval_processes_fewer_tokens_and_reports_them():
    model = _vmoe()
    images = torch.randn(8, 1, 28, 28)
    T = 8 * 17  # tokens entering each MoE layer
    model.set_eval_capacity(None)  # dropless evaluation: every token reaches an expert
    model.eval()
    with torch.no_grad():
        full = model(images)
    assert full.metrics["moe_tokens_processed"] == 2 * T and full.metrics["moe_processed_fraction"] == 1.0

    captured = []
    hooks = [m.register_forward_hook(lambda mod, args, out: captured.append(args[0])) for m in model.moe_layers()]
    model.set_eval_capacity(0.25, batch_priority=True)
    with torch.no_grad():
        out = model(images)
    for h in hooks:
        h.remove()
    per_layer = [int(a.stats["tokens_processed"]) for a in out.moe_aux]
    assert int(out.metrics["moe_tokens_processed"]) == sum(per_layer)
    # capacity per expert and group: ceil(0.25 * 68 * 2 / 4) = ceil(8.5) = 9; 4 experts x 9 slots x 2 groups = 72
    for n in per_layer:
        assert 0 < n <= 72 < T
    assert out.metrics["moe_processed_fraction"] < 1.0

    # BPR at work: inside every group, the top-1 assignments an expert kept have higher priority (top-1 gate) than
    # the top-1 assignments to that expert it dropped.
    for moe, x_BLD, aux in zip(model.moe_layers(), captured, out.moe_aux, strict=True):
        probs_TE = moe.router.logits(x_BLD.reshape(-1, 16)).softmax(-1)
        prio_T, top1_T = probs_TE.max(-1)
        plan = aux.plan
        for g in range(2):
            for e in range(4):
                rows = plan.expert_idx_N == e
                kept = set(plan.token_idx_N[rows].tolist())
                mine = [tok for tok in range(g * 68, (g + 1) * 68) if top1_T[tok] == e]
                k = [prio_T[tok] for tok in mine if tok in kept]
                d = [prio_T[tok] for tok in mine if tok not in kept]
                if k and d:
                    assert min(k) >= max(d)

    model.train()  # training keeps its own capacity
    assert all(m.router.capacity_factor == 1.05 and not m.router.batch_priority for m in model.moe_layers())
    model.eval()
    assert all(m.router.capacity_factor == 0.25 and m.router.batch_priority for m in model.moe_layers())


def test_eval_capacity_from_the_config():
    model = _vmoe(**{"moe.eval_capacity_factor": 0.5, "moe.eval_batch_priority": True})
    assert model.moe_layers()[0].router.capacity_factor == 1.05
    model.eval()
    assert model.moe_layers()[0].router.capacity_factor == 0.5 and model.moe_layers()[0].router.batch_priority


def test_set_eval_capacity_validates():
    model = _vmoe()
    with pytest.raises(ValueError, match="capacity_factor"):
        model.set_eval_capacity(0.0)
    with pytest.raises(ValueError, match="batch_priority"):
        model.set_eval_capacity(None, batch_priority=True)


def test_classification_outputs_and_accuracy():
    model = _vmoe().eval()
    images = torch.randn(4, 1, 28, 28)
    targets = torch.tensor([0, 1, 2, 3])
    out = model(images, targets)
    assert out.logits.shape == (4, 10)
    expected = (out.logits.argmax(-1) == targets).float().mean()
    assert out.metrics["accuracy"] == expected
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, targets))


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.randn(4, 3, 28, 28), "images must be"),
        (torch.randn(4, 1, 32, 32), "images must be"),
        (torch.zeros(4, 1, 28, 28, dtype=torch.long), "floating-point"),
    ],
)
def test_bad_images_raise(images, match):
    with pytest.raises(ValueError, match=match):
        _vmoe()(images)


def test_eval_capacity_is_refused_for_routers_without_one_and_cleared_by_a_router_swap():
    from smoe.interop import swap_router

    # usmoe has no per-expert capacity: the old attribute write went through silently, the declaration refuses it
    model = build_model("vit_debug", **{"moe.router": "usmoe", "moe.capacity_factor": None, "moe.router_kwargs": {}})
    with pytest.raises(ValueError, match="router 'usmoe' has no capacity_factor"):
        model.set_eval_capacity(1.0)
    # a V-MoE with an evaluation capacity, swapped to usmoe without training: the old rule's eval capacity goes too
    vmoe = _vmoe(**{"moe.eval_capacity_factor": 0.5})
    assert swap_router(vmoe, "usmoe")
    vmoe.eval()  # would raise if the 0.5 were still to be applied to the new router
    assert all(m.capacity_factor is None for m in vmoe.moe_layers())
    with torch.no_grad():
        vmoe(torch.randn(4, 1, 28, 28))
