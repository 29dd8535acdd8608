"""The experiment scripts run end to end on debug presets (their figures come from full runs, in docs/)."""

import json
import subprocess
import sys
from pathlib import Path

EXP = Path(__file__).resolve().parent.parent / "experiments"


def test_upcycling_experiment_quick_then_training_free_swaps(tmp_path):
    out = tmp_path / "up"
    done = subprocess.run(
        [sys.executable, str(EXP / "upcycling.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(b) upcycled" in done.stdout and "Paired per seed, upcycled - dense" in done.stdout
    assert "At equal training FLOPs" in done.stdout
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["seed"] for r in results] == [0, 1]
    for r in results:  # the three arms end at the same step; upcycled starts where dense stood at N
        assert set(r["final"]) == {"dense", "upcycled", "scratch"}
        assert r["curves"]["upcycled"][0][1] != r["curves"]["upcycled"][-1][1]
        assert r["extra"]["upcycled"]["flops"] > r["extra"]["dense"]["flops"] > 0  # top-2 of copies costs more
    assert (out / "upcycling.png").stat().st_size > 10_000
    swaps = tmp_path / "swaps"
    done = subprocess.run(
        [sys.executable, str(EXP / "training_free_swaps.py"), "--runs", str(out), "--out", str(swaps),
         "--skip", "smollm2", "minilm"],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    smoe_results = json.loads((swaps / "results.json").read_text())["smoe"]
    assert len(smoe_results["upcycled/usmoe"]) == 2 and all(v > 0 for v in smoe_results["scratch/expert_choice"])
    report = (swaps / "report.md").read_text()
    assert "| upcycled | usmoe |" in report and "swap - token choice, paired" in report


def test_claims_quick(tmp_path):
    out = tmp_path / "claims"
    done = subprocess.run(
        [sys.executable, str(EXP / "claims.py"), "--quick", "--seeds", "2", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "claims.json").read_text())
    assert set(record["claims"]) == {"lm", "s2moe", "vision", "momentum", "bpr", "vae", "vae_sweep"}
    rows = [r for part in record["claims"].values() for r in part["rows"]]
    assert len(rows) == 17
    for r in rows:  # every row measured on both seeds, with a mechanical verdict
        assert r["paired"]["n"] == 2, r["claim"]
        assert r["verdict"] in ("holds", "does not hold", "inconclusive at this scale")
    table = (out / "claims.md").read_text()
    assert table.count("\n| ") == 17 and "Expert choice beats token choice" in table
