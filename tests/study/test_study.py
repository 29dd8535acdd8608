"""The router study end to end (``smoe study --quick`` on a tiny budget) and its fairness rules."""

from __future__ import annotations

import json
import math

import pytest
import torch

from smoe.cli.main import main
from smoe.models import build_model, get_preset
from smoe.study import (
    NAMED_VARIANTS,
    format_leaderboard,
    leaderboard_rows,
    resolve_variants,
    variant_overrides,
)
from smoe.study.runner import StudyRun

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_lm_study_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    routers = ["token_choice", "aux_free", "expert_choice"]
    argv = [
        "study",
        "--quick",
        "--routers",
        ",".join(routers),
        "--dataset",
        "pydoc",
        "--steps",
        "6",
        "--set",
        "train.eval_every=3",
        "--set",
        "train.eval_batches=2",
        "--seeds",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in routers:
        assert name in printed
    assert "bits/byte" in printed and "load CV" in printed and "tokens/s" in printed

    rows = json.loads((out / "leaderboard.json").read_text())
    assert sorted(r["router"] for r in rows) == sorted(routers)
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows] == sorted(r["loss"] for r in rows)  # ranked by validation loss
    for r in rows:
        for key in ("loss", "bpb", "load_cv", "drop_rate", "dead_experts", "tokens_per_s", "num_parameters"):
            assert math.isfinite(r[key]), (r["router"], key)
        assert r["bpb"] == pytest.approx(r["loss"] / math.log(2))
    # same budget: same total and active parameters for every router
    assert len({r["num_parameters"] for r in rows}) == 1 and len({r["num_active_parameters"] for r in rows}) == 1
    by_name = {r["router"]: r for r in rows}
    assert by_name["expert_choice"]["load_cv"] == pytest.approx(0.0, abs=1e-9)  # balanced by construction
    assert by_name["expert_choice"]["group_mode"] == "position" and by_name["token_choice"]["group_mode"] == "batch"

    report = (out / "report.md").read_text()
    assert "## Leaderboard" in report and "| 1 |" in report and "expert_load.png" in report
    assert "One seed per router" in report.splitlines()[2]  # the first lines say what can be concluded
    assert "RC" in printed and "NMI" in printed and "fluct" in printed and "loss @10% noise" in printed
    for r in rows:  # the papers' measurements of every run: fluctuation recorded at the evaluations 3 and 6
        assert r["rc"] > 0 and 0 <= r["nmi"] <= 1 and 0 <= r["fluct"] <= 1 and r["robust"] > 0, r["router"]
    assert "Routed representations (t-SNE, first seed)" in report and "tsne_expert_choice.png" in report
    for png in ("curves.png", "expert_load.png", "tradeoff.png", "measures.png", *(f"tsne_{n}.png" for n in routers)):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, png
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 3 and all(r["error"] is None for r in results["runs"])
    assert [s for s, _ in results["runs"][0]["validation_curve"]] == [3, 6]
    # every run folder is a normal run: `smoe eval` works on it
    assert main(["eval", str(out / "runs" / "expert_choice-seed0")]) == 0
    assert main(argv) == 2 and "already holds a study report" in capsys.readouterr().err


def test_quick_vision_study_with_seeds(tmp_path, capsys):
    out = tmp_path / "vision"
    argv = [
        "study",
        "--quick",
        "--task",
        "vision",
        "--dataset",
        "digits",
        "--routers",
        "token_choice,expert_choice",
        "--seeds",
        "2",
        "--steps",
        "3",
        "--set",
        "train.eval_batches=1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "accuracy" in capsys.readouterr().out
    rows = json.loads((out / "leaderboard.json").read_text())
    assert [r["seeds"] for r in rows] == [2, 2] and all("accuracy_std" in r for r in rows)
    assert all("accuracy_ci" in r and "rc" in r for r in rows)  # 95% intervals over the two seeds
    assert {r["router"]: r.get("vs_baseline") for r in rows}["token_choice"] == "baseline"
    assert "paired by seed with 95% t intervals" in (out / "report.md").read_text().splitlines()[2]
    assert [r["accuracy"] for r in rows] == sorted((r["accuracy"] for r in rows), reverse=True)
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "expert_choice-seed0",
        "expert_choice-seed1",
        "token_choice-seed0",
        "token_choice-seed1",
    ]
    config = json.loads((out / "runs" / "expert_choice-seed1" / "config.json").read_text())
    assert config["train"]["seed"] == 1 and config["model"]["moe"]["capacity_factor"] is None


def test_variants_are_causal_safe_and_compute_matched():
    lm = get_preset("lm_small")
    assert variant_overrides(NAMED_VARIANTS["token_choice"], lm) == {
        "moe.router": "token_choice",
        "moe.router_kwargs": lm.moe.router_kwargs,
    }
    ec = variant_overrides(resolve_variants(["expert_choice"])[0], lm)
    assert ec["moe.group_mode"] == "position" and ec["moe.capacity_factor"] is None
    free = variant_overrides(NAMED_VARIANTS["aux_free"], lm)
    assert free["moe.router_kwargs"] == {"expert_bias": True, "balance_loss_weight": 0.0}
    assert "moe.group_mode" not in free  # dropless token choice does not couple tokens
    vit = get_preset("vit_small")
    kept = variant_overrides(NAMED_VARIANTS["token_choice"], vit)
    assert kept["moe.router_kwargs"] == vit.moe.router_kwargs and "moe.capacity_factor" not in kept
    assert "moe.group_mode" not in variant_overrides(resolve_variants(["expert_choice"], "vision")[0], vit)
    # Soft MoE per image, E * num_slots slots ~ N * K token-expert evaluations (17 tokens, top-2, 8 experts: 4 slots)
    soft = variant_overrides(resolve_variants(["soft"], "vision")[0], vit)
    assert soft["moe.group_mode"] == "sequence" and soft["moe.images_per_group"] is None
    assert soft["moe.router_kwargs"] == {"num_slots": round(vit.tokens_per_image * 2 / 8)} == {"num_slots": 4}
    model = build_model("vit_small", **soft).eval()
    x = torch.randn(3, 1, 28, 28)  # 3 images: no multiple of 8 needed once groups are single images
    logits = model(x).logits
    x2 = x.clone()
    x2[1:] = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(model(x2).logits[0], logits[0])  # per-image routing: image 0 ignores the others


def test_resolve_variants_defaults_and_errors():
    names = [v.name for v in resolve_variants(None)]
    assert names == ["token_choice", "expert_choice", "xmoe", "hash", "random"] and "force_balanced" not in names
    assert "hash" not in [v.name for v in resolve_variants(None, "vision")]
    with pytest.raises(ValueError, match="unknown router 'teleport'; expected one of"):
        resolve_variants(["teleport"])
    with pytest.raises(ValueError, match="listed twice"):
        resolve_variants(["usmoe", "usmoe"])


def test_leaderboard_means_over_seeds_and_lists_failures_last():
    variant = NAMED_VARIANTS["token_choice"]
    base = {
        "load_cv": 0.5,
        "max_load": 1.5,
        "drop_rate": 0.0,
        "dead_experts": 0.0,
        "entropy": 1.0,
        "tokens_per_s": 100.0,
        "num_parameters": 10,
        "num_active_parameters": 5,
        "bpb": 1.0,
        "ppl": 3.0,
    }
    runs = [
        StudyRun(variant=variant, seed=0, run_dir=None, final={**base, "loss": 1.0}),
        StudyRun(variant=variant, seed=1, run_dir=None, final={**base, "loss": 2.0}),
        StudyRun(variant=NAMED_VARIANTS["aux_free"], seed=0, run_dir=None, final={**base, "loss": 1.2}),
        StudyRun(variant=resolve_variants(["usmoe"])[0], seed=0, run_dir=None, error="RuntimeError: boom"),
    ]
    rows = leaderboard_rows(runs, "lm")
    assert [r["router"] for r in rows] == ["aux_free", "token_choice", "usmoe"]
    assert rows[1]["loss"] == 1.5 and rows[1]["loss_std"] == pytest.approx(math.sqrt(0.5)) and rows[1]["seeds"] == 2
    assert "rank" not in rows[2] and rows[2]["error"] == "RuntimeError: boom"
    table = format_leaderboard(rows, "lm")
    # the 95% t interval of (1, 2): 12.706 * 0.7071 / sqrt(2) = 6.353
    assert "1.5000 ± 6.3530" in table and "FAILED" in table
