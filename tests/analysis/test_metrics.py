"""The seeds' measurements (smoe.analysis), each on a hand-worked input (the arithmetic in a comment), with the
invariances they must have."""

from __future__ import annotations

import math

import pytest
import torch

import smoe
from smoe.analysis.capacity_curve import capacity_curve
from smoe.analysis.collapse import class_covariances, representation_collapse
from smoe.analysis.embedding import embed_2d, plot_embedding, subsample
from smoe.analysis.fluctuation import fluctuation_series, routing_fluctuation
from smoe.analysis.probe import probe_routing
from smoe.analysis.robustness import contaminated_loss, mean_corruption_error, substitute_tokens
from smoe.analysis.specialisation import (
    inter_run_consistency,
    mutual_information,
    normalized_mutual_information,
    purity,
)

F64 = torch.float64


# -- representation collapse -----------------------------------------------------------------------------------


def test_rc_hand_worked_1d():
    # class 0 = {0, 2} (mean 1), class 1 = {4, 6} (mean 5): Sigma_W = (1+1+1+1)/4 = 1;
    # class means 1 and 5 around 3: Sigma_B = (4 + 4)/2 = 4; RC = 1 * 1/4 = 0.25
    h = torch.tensor([[0.0], [2.0], [4.0], [6.0]])
    labels = torch.tensor([0, 0, 1, 1])
    w, b = class_covariances(h, labels)
    assert w.item() == pytest.approx(1.0) and b.item() == pytest.approx(4.0)
    assert representation_collapse(h, labels) == pytest.approx(0.25)


def test_rc_hand_worked_2d_ignores_spread_outside_the_class_means_span():
    # A = {(0, 1), (2, -1)}, mean (1, 0); B = {(4, 1), (6, -1)}, mean (5, 0). Every deviation is +-(1, -1):
    # Sigma_W = [[1, -1], [-1, 1]]; Sigma_B = [[4, 0], [0, 0]], pinv = [[1/4, 0], [0, 0]];
    # Sigma_W Sigma_B^+ = [[1/4, 0], [-1/4, 0]]: trace 1/4
    h = torch.tensor([[0.0, 1.0], [2.0, -1.0], [4.0, 1.0], [6.0, -1.0]])
    assert representation_collapse(h, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.25)


def test_rc_is_invariant_to_rotation_scaling_and_translation_and_ignores_dropped_tokens():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(200, 6, generator=g, dtype=F64)
    labels = torch.randint(0, 4, (200,), generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))
    rc = representation_collapse(h, labels)
    assert representation_collapse(3.0 * h @ q.T + 5.0, labels) == pytest.approx(rc, rel=1e-9)
    dropped = torch.cat([labels, torch.full((5,), -1)])
    assert representation_collapse(torch.cat([h, torch.randn(5, 6, dtype=F64)]), dropped) == pytest.approx(rc)
    # tighter classes (the same means, half the within-class spread) -> a quarter of the RC: more collapse
    means = torch.stack([h[labels == c].mean(0) for c in range(4)])
    tight = means[labels] + 0.5 * (h - means[labels])
    assert representation_collapse(tight, labels) == pytest.approx(rc / 4, rel=1e-9)


def test_rc_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        representation_collapse(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))


# -- routing fluctuation -----------------------------------------------------------------------------------------


def test_fluctuation_hand_worked_top1_and_topk_sets():
    # top-1: tokens 1 and 3 change expert (1 -> 2, 3 -> 1): 2 of 4
    assert routing_fluctuation(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 2, 1])) == 0.5
    # top-2 sets: {0, 1} = {1, 0} unchanged; {2, 3} -> {3, 1} changed: 1 of 2
    a = torch.tensor([[0, 1], [2, 3]])
    b = torch.tensor([[1, 0], [3, 1]])
    assert routing_fluctuation(a, b) == 0.5
    series = fluctuation_series([torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([1, 0])])
    # consecutive: (0,1)->(0,0) 1/2, (0,0)->(1,0) 1/2; to the final (1,0): 2/2, 1/2, 0
    assert series == {"consecutive": [0.5, 0.5], "to_final": [1.0, 0.5, 0.0]}


def test_a_frozen_router_does_not_fluctuate():
    torch.manual_seed(0)
    layer = smoe.MoE(8, 16, 4, 2)
    x = torch.randn(2, 10, 8)
    runs = [probe_routing(layer, [(x, None)])[0].choices_NK for _ in range(3)]
    assert fluctuation_series(runs) == {"consecutive": [0.0, 0.0], "to_final": [0.0, 0.0, 0.0]}
    with torch.no_grad():  # a changed gate moves some tokens
        layer.router.gate.weight.add_(torch.randn_like(layer.router.gate.weight))
    assert routing_fluctuation(runs[0], probe_routing(layer, [(x, None)])[0].choices_NK) > 0


# -- specialisation ----------------------------------------------------------------------------------------------


def test_mutual_information_and_purity_hand_worked():
    # the expert determines the label: I = H(label) = ln 2, normalised 1, purity 1
    e, y = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1])
    assert mutual_information(e, y) == pytest.approx(math.log(2))
    assert normalized_mutual_information(e, y) == pytest.approx(1.0)
    assert purity(e, y) == 1.0
    # independent: p(x, y) = 1/4 = p(x) p(y) -> I = 0; each expert's majority label covers half of its tokens
    e = torch.tensor([0, 1, 0, 1])
    assert mutual_information(e, y) == pytest.approx(0.0, abs=1e-12)
    assert purity(e, y) == 0.5
    # 3 tokens: experts (0, 0, 1), labels (0, 1, 1): p = [[1/3, 1/3], [0, 1/3]], p(x) = (2/3, 1/3), p(y) = (1/3, 2/3)
    # I = 1/3 ln((1/3)/(2/9)) + 1/3 ln((1/3)/(4/9)) + 1/3 ln((1/3)/(2/9)) = 1/3 (2 ln 1.5 + ln 0.75)
    want = (2 * math.log(1.5) + math.log(0.75)) / 3
    assert mutual_information(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])) == pytest.approx(want)
    assert purity(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_mutual_information_is_invariant_to_renaming_experts_and_ignores_dropped():
    g = torch.Generator().manual_seed(0)
    e, y = torch.randint(0, 4, (300,), generator=g), torch.randint(0, 3, (300,), generator=g)
    renamed = torch.tensor([2, 0, 3, 1])[e]
    assert mutual_information(renamed, y) == pytest.approx(mutual_information(e, y))
    assert purity(renamed, y) == pytest.approx(purity(e, y))
    assert mutual_information(torch.cat([e, torch.tensor([-1])]), torch.cat([y, torch.tensor([0])])) == (
        pytest.approx(mutual_information(e, y))
    )


def test_inter_run_consistency_hand_worked():
    # proportional loads correlate 1: IC = 1; reversed loads correlate -1: (1 + 1 - 1 - 1) / 4 = 0
    assert inter_run_consistency(torch.tensor([[1.0, 2, 3], [2, 4, 6]])) == pytest.approx(1.0)
    assert inter_run_consistency(torch.tensor([[1.0, 2, 3], [3, 2, 1]])) == pytest.approx(0.0)
    assert inter_run_consistency(torch.tensor([[1.0, 2, 3], [3, 2, 1]]), sort=True) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal loads"):
        inter_run_consistency(torch.tensor([[1.0, 1, 1], [3, 2, 1]]))


# -- robustness --------------------------------------------------------------------------------------------------


def test_mce_hand_worked():
    # model errors on c: 0.2 + 0.4 = 0.6; baseline 0.4 + 0.4 = 0.8 -> CE_c = 0.75; on d: 0.1 / 0.2 = 0.5
    errors = {"c": {1: 0.2, 2: 0.4}, "d": {1: 0.1}}
    base = {"c": {1: 0.4, 2: 0.4}, "d": {1: 0.2}}
    out = mean_corruption_error(errors, base)
    assert out["CE"] == pytest.approx({"c": 0.75, "d": 0.5})
    assert out["mCE"] == pytest.approx(0.625)
    assert out["mean_error"] == pytest.approx((0.2 + 0.4 + 0.1) / 3)
    assert mean_corruption_error(base, base)["mCE"] == pytest.approx(1.0)  # the baseline against itself
    with pytest.raises(ValueError, match="no error"):
        mean_corruption_error(errors, {"c": {1: 0.0, 2: 0.0}, "d": {1: 0.2}})


def test_token_substitution_rates():
    x = torch.arange(10_000) % 256
    assert torch.equal(substitute_tokens(x, 0.0, 256), x)
    g = torch.Generator().manual_seed(0)
    changed = (substitute_tokens(x, 0.2, 256, generator=g) != x).double().mean().item()
    assert changed == pytest.approx(0.2 * (1 - 1 / 256), abs=0.015)
    with pytest.raises(ValueError, match="rate"):
        substitute_tokens(x, 1.5, 256)


def test_contaminated_loss_at_rate_zero_is_the_clean_loss():
    model = smoe.build_model("lm_debug").eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    clean = float(model(x, y).loss)
    assert contaminated_loss(model, [(x, y)], 0.0, 256) == pytest.approx(clean)
    assert contaminated_loss(model, [(x, y)], 1.0, 256) != pytest.approx(clean)


# -- probes, capacity curve, embedding --------------------------------------------------------------------------


@pytest.mark.parametrize("group_mode", ["batch", "position"])
def test_probe_pairs_each_representation_with_its_label_and_choices(group_mode):
    torch.manual_seed(0)
    layer = smoe.MoE(4, 8, 3, 2, group_mode=group_mode)
    x = torch.randn(3, 5, 4)
    labels = torch.arange(15).view(3, 5)
    x[..., 0] = labels.float()  # the label is written into the representation
    (p,) = probe_routing(layer, [(x, labels)])
    assert torch.equal(p.h_ND[:, 0], p.labels_N.float())
    _, aux = layer(x)
    # the top-1 choice is each token's expert of largest combine weight
    w = torch.zeros(15, 3).index_put_((aux.plan.token_idx_N, aux.plan.expert_idx_N), aux.plan.weight_N)
    assert torch.equal(p.top1_N, w.argmax(-1))
    # one label per example is repeated over its tokens
    (p,) = probe_routing(layer, [(x, torch.tensor([7, 8, 9]))])
    assert sorted(p.labels_N.tolist()) == [7] * 5 + [8] * 5 + [9] * 5


def test_capacity_curve_processes_less_below_one_and_bpr_keeps_the_same_budget():
    torch.manual_seed(0)
    model = smoe.build_model("vit_debug", **{"moe.capacity_factor": 1.0})
    images, labels = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    vanilla = capacity_curve(model, images, labels, [0.25, 1.0, 4.0], batch_priority=False)
    bpr = capacity_curve(model, images, labels, [0.25, 1.0, 4.0], batch_priority=True)
    assert [p["processed"] for p in vanilla] == [p["processed"] for p in bpr]  # the same capacity, other tokens
    assert vanilla[0]["processed"] < vanilla[1]["processed"] <= vanilla[2]["processed"] == 1.0
    assert vanilla[2]["accuracy"] == bpr[2]["accuracy"]  # nothing dropped: the same model
    assert all(m.capacity_state()[1] is None for m in model.modules() if isinstance(m, smoe.MoE))


def test_embedding_and_plot(tmp_path):
    g = torch.Generator().manual_seed(0)
    h = torch.cat([torch.randn(20, 5, generator=g), torch.randn(20, 5, generator=g) + 10])
    xy = embed_2d(h, seed=0)
    assert xy.shape == (40, 2)
    # two far-apart clusters stay apart: every point is nearer its own cluster's centre
    a, b = xy[:20].mean(0), xy[20:].mean(0)
    assert (((xy[:20] - a) ** 2).sum(1) < ((xy[:20] - b) ** 2).sum(1)).all()
    out = plot_embedding(xy, torch.tensor([0] * 20 + [1] * 20), torch.tensor([0, 1] * 20), tmp_path / "t.png")
    assert out.stat().st_size > 1000
    assert subsample(10, 20).tolist() == list(range(10)) and len(subsample(100, 7)) == 7
