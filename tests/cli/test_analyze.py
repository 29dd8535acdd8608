"""``smoe analyze`` on debug runs (small budgets): the vision run gets the robustness table, the capacity curve
(vanilla vs BPR) and the t-SNE plot; the LM run the byte-class specialisation and the contaminated-text loss;
both the fluctuation over their checkpoints."""

from __future__ import annotations

import json

import pytest

from smoe.cli.main import main
from smoe.train.run import resolve_run_config, train_run


@pytest.fixture(scope="module")
def vision_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    runs = {}
    for name, seed in (("base", "1"), ("tc", "0")):  # the baseline: the same router, another seed
        over = {"train.steps": "12", "train.ckpt_every": "6", "train.seed": seed, "moe.capacity_factor": "1.0"}
        train_run(resolve_run_config("vit_debug", over), root / name, progress=False)
        runs[name] = root / name
    return runs


def test_analyze_a_vision_run(vision_runs, capsys):
    run = vision_runs["tc"]
    args = ["analyze", str(run), "--probe", "32", "--tsne", "100", "--robust", "24", "--corruptions",
            "gaussian_noise,fog", "--severities", "1,5", "--capacities", "0.25,1,2", "--baseline",
            str(vision_runs["base"])]  # fmt: skip
    assert main(args) == 0
    out = run / "analysis"
    result = json.loads((out / "analysis.json").read_text())
    md = (out / "analysis.md").read_text()
    assert capsys.readouterr().out.strip().startswith("## Analysis of")
    # robustness: clean accuracy, one error per (corruption, severity), mCE relative to the baseline run
    rb = result["robustness"]
    assert set(rb["errors"]) == {"gaussian_noise", "fog"} and set(rb["errors"]["fog"]) == {"1", "5"}
    assert 0 <= rb["mean_corrupted_accuracy"] <= 1 and rb["mCE"] > 0
    assert "| gaussian_noise |" in md and "mCE" in md
    # adaptive compute: vanilla and BPR at each capacity factor, less processed below 1
    cc = result["capacity_curve"]
    assert [p["capacity_factor"] for p in cc["bpr"]] == [0.25, 1.0, 2.0]
    assert cc["vanilla"][0]["processed"] < cc["vanilla"][2]["processed"]
    assert (out / "capacity_curve.png").stat().st_size > 1000
    # probe routing: RC and specialisation per layer, the t-SNE plot
    layer = result["layers"][0]
    assert layer["rc"] > 0 and 0 <= layer["nmi"] <= 1 and 0 < layer["purity"] <= 1
    assert (out / "tsne_layer0.png").stat().st_size > 1000
    # fluctuation over the two checkpoints
    fl = result["fluctuation"]
    assert fl["steps"] == [6, 12]
    series = next(iter(fl["layers"].values()))
    assert len(series["consecutive"]) == 1 and series["to_final"][-1] == 0.0


def test_analyze_a_language_model_run(tmp_path):
    run = tmp_path / "lm"
    train_run(resolve_run_config("lm_debug", {"train.steps": "4"}), run, progress=False)
    assert main(["analyze", str(run), "--probe", "4", "--tsne", "0", "--contamination", "0,0.5",
                 "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    result = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert set(result["contamination"]) == {"0.0", "0.5"}
    assert result["layers"] and all(0 <= r["nmi"] <= 1 for r in result["layers"])  # byte classes as labels
    assert "needs at least 2" in result["fluctuation"]["note"]


def test_analyze_refuses_bad_values(tmp_path, capsys):
    assert main(["analyze", str(tmp_path), "--severities", "0,7"]) == 2
    assert "severities" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "none")]) == 2
