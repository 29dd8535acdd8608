"""The study's confidence intervals, its paired comparison with the baseline router, the report's first lines,
and the per-run measurements (probe recorded during training without changing it)."""

from __future__ import annotations

import math

import pytest
import torch

from smoe.data import DataConfig, build_data
from smoe.models import build_model
from smoe.study import leaderboard_rows, resolve_variants
from smoe.study.measures import ProbeRecorder, StudyProbe, measure_run
from smoe.study.report import mean_ci, paired_differences, t975, verdict_lines
from smoe.study.runner import StudyRun
from smoe.train.config import TrainConfig
from smoe.train.trainer import Trainer


def test_t_interval_hand_worked():
    # (1, 2, 3): mean 2, sample sd 1, t_{0.975, 2} = 4.303 -> half-width 4.303 / sqrt(3) = 2.4843
    m, ci = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and ci == pytest.approx(4.303 / math.sqrt(3))
    assert math.isnan(mean_ci([1.0])[1]) and math.isnan(mean_ci([1.0, math.nan])[1])
    assert t975(1) == 12.706 and t975(11) == t975(10) and t975(1000) == 1.96


def _runs(losses: dict[str, list[float]]):
    return [
        StudyRun(variant=resolve_variants([name])[0], seed=s, run_dir=None, final={"loss": v, "robust": v + 0.1})
        for name, values in losses.items()
        for s, v in enumerate(values)
    ]


def test_paired_differences_mark_only_what_is_beyond_seed_noise():
    # aux_free is 0.1 lower on both seeds: diffs (-0.1, -0.1), sd 0 -> beyond noise;
    # expert_choice is +0.1 then -0.1: mean 0, half-width 12.706 * 0.1414 / 1.414 = 1.27 -> not beyond
    runs = _runs({"token_choice": [2.0, 2.2], "aux_free": [1.9, 2.1], "expert_choice": [2.1, 2.1]})
    d = paired_differences(runs, "lm", "token_choice")
    assert d["aux_free"]["loss"]["diff"] == pytest.approx(-0.1) and d["aux_free"]["loss"]["beyond"]
    assert d["expert_choice"]["loss"]["diff"] == pytest.approx(0.0, abs=1e-12)
    assert d["expert_choice"]["loss"]["ci"] == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))
    assert not d["expert_choice"]["loss"]["beyond"]
    rows = leaderboard_rows(runs, "lm")
    by = {r["router"]: r for r in rows}
    assert by["token_choice"]["vs_baseline"] == "baseline"
    assert by["aux_free"]["vs_baseline"].endswith("*") and not by["expert_choice"]["vs_baseline"].endswith("*")


class _Result:
    def __init__(self, runs, task="lm"):
        self.leaderboard, self.task = leaderboard_rows(runs, task), task


def test_the_report_says_first_whether_anything_separates():
    nothing = _Result(_runs({"token_choice": [2.0, 2.2], "expert_choice": [2.1, 2.1]}))
    assert "No router's validation loss differs from `token_choice` beyond seed noise" in verdict_lines(nothing)[0]
    some = _Result(_runs({"token_choice": [2.0, 2.2], "aux_free": [1.9, 2.1]}))
    assert "`aux_free` lower validation loss" in verdict_lines(some)[0]
    one = _Result(_runs({"token_choice": [2.0], "aux_free": [1.9]}))
    assert "One seed per router" in verdict_lines(one)[0]


def _lm():
    data = build_data("lm", DataConfig(dataset="pydoc"), batch_size=4, seq_len=16, seed=0)
    return data


def test_probe_recording_leaves_training_unchanged_and_measures_fluctuation(tmp_path):
    data = _lm()
    cfg = TrainConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=2, eval_batches=1)
    probe = StudyProbe("lm", data, examples=4, eval_batches=1)

    def train(recorder):
        torch.manual_seed(0)
        model = build_model("lm_debug", **{"moe.router_kwargs": {"noise": "gaussian"}})
        Trainer(model, data, cfg, run_dir=None, progress=False, on_step=recorder).fit()
        return model

    plain = train(None)
    rec = ProbeRecorder(probe, cfg.eval_every, cfg.steps, tmp_path)
    recorded = train(rec)
    for a, b in zip(plain.parameters(), recorded.parameters(), strict=True):  # noisy routing: RNG restored
        assert torch.equal(a, b)
    assert sorted(rec.records) == [2, 4, 6] and len(rec.records[2]) == 1  # lm_debug has one MoE layer
    assert 0.0 <= rec.fluctuation() <= 1.0
    again = ProbeRecorder(probe, cfg.eval_every, cfg.steps, tmp_path)  # a resumed run reads the records back
    assert sorted(again.records) == [2, 4, 6]
    m = measure_run(recorded, probe, rec)
    assert set(m) == {"rc", "nmi", "fluct", "robust"} and m["fluct"] == rec.fluctuation()
    assert 0.0 <= m["nmi"] <= 1.0 and m["robust"] > 0


def test_inter_run_consistency_of_the_loads_over_seeds():
    # seed 0 loads (0.5, 0.3, 0.2), seed 1 (0.2, 0.5, 0.3): the same profile once sorted -> IC = 1;
    # a router whose seeds put everything on one expert vs spread evenly has a constant layer -> undefined (nan)
    def run(name, seed, load):
        return StudyRun(variant=resolve_variants([name])[0], seed=seed, run_dir=None,
                        final={"loss": 1.0, "layers": [{"load": load}]})  # fmt: skip

    runs = [run("token_choice", 0, [0.5, 0.3, 0.2]), run("token_choice", 1, [0.2, 0.5, 0.3]),
            run("hash", 0, [1 / 3] * 3), run("hash", 1, [1 / 3] * 3)]  # fmt: skip
    rows = {r["router"]: r for r in leaderboard_rows(runs, "lm")}
    assert rows["token_choice"]["ic"] == pytest.approx(1.0)
    assert math.isnan(rows["hash"]["ic"])
