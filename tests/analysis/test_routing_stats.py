"""Routing diagnostics on hand-worked counts."""

from __future__ import annotations

import math

import pytest
import torch

from smoe.analysis import RoutingStatsAccumulator, load_summary, summarize_layers
from smoe.layers import MoEAux


def _aux(counts, drop=0.0, entropy=None):
    stats = {
        "tokens_per_expert": torch.tensor(counts, dtype=torch.long),
        "drop_rate": torch.tensor(drop),
        "unrouted_fraction": torch.tensor(0.0),
    }
    if entropy is not None:
        stats["router_entropy"] = torch.tensor(entropy)
    return MoEAux(loss=torch.zeros(()), stats=stats)


def test_load_summary_hand_worked():
    # counts [3, 1, 0, 0]: mean 1; deviations 2, 0, -1, -1 -> variance (4+0+1+1)/4 = 1.5 -> cv sqrt(1.5)
    s = load_summary(torch.tensor([3, 1, 0, 0]))
    assert s["load_cv"] == pytest.approx(math.sqrt(1.5)) and s["max_load"] == 3.0 and s["dead_experts"] == 2.0
    assert load_summary(torch.tensor([5, 5, 5]))["load_cv"] == 0.0
    # everything on one of E experts: cv = sqrt(E - 1)
    assert load_summary(torch.tensor([8, 0, 0, 0, 0]))["load_cv"] == pytest.approx(2.0)


def test_accumulator_sums_counts_before_the_ratio():
    acc = RoutingStatsAccumulator()
    # two calls whose loads are each unbalanced but together balanced: the evaluation load is perfectly even
    acc.add([_aux([4, 0], drop=0.5, entropy=0.2), _aux([2, 2], entropy=0.6)])
    acc.add([_aux([0, 4], drop=0.0, entropy=0.4), _aux([2, 2], entropy=0.6)])
    layer0, layer1 = acc.summary()
    assert layer0["load_cv"] == 0.0 and layer0["dead_experts"] == 0.0 and layer0["load"] == [0.5, 0.5]
    assert layer0["drop_rate"] == pytest.approx(0.25)  # token-weighted mean of 0.5 and 0.0 (4 tokens each)
    assert layer0["entropy"] == pytest.approx(0.3)
    overall = summarize_layers([layer0, layer1])
    assert overall["entropy"] == pytest.approx(0.45) and overall["drop_rate"] == pytest.approx(0.125)
    with pytest.raises(ValueError, match="expected 2 MoE layers"):
        acc.add([_aux([1, 1])])


def test_dense_model_and_missing_entropy():
    assert summarize_layers([])["load_cv"] == 0.0 and math.isnan(summarize_layers([])["entropy"])
    acc = RoutingStatsAccumulator()
    acc.add([_aux([2, 0, 2])])  # e.g. hash routing: no router probabilities
    (layer,) = acc.summary()
    assert math.isnan(layer["entropy"]) and layer["dead_experts"] == 1.0
