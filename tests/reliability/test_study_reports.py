"""Issue 14, item 15: the study says what it changed (a user's --set it overrode, and per router what ran), breaks
ties by validation loss, and shows n/a for a value that is missing."""

from __future__ import annotations

from types import SimpleNamespace

from smoe.study import StudyConfig, run_study
from smoe.study.report import _fmt, leaderboard_rows


def test_the_study_says_when_it_overrides_a_set_and_what_ran(tmp_path):
    lines: list[str] = []
    cfg = StudyConfig(task="lm", quick=True, routers=["token_choice", "expert_choice"], out_dir=str(tmp_path),
                      progress=False, overrides={"moe.group_mode": "batch", "train.steps": "4"})  # fmt: skip
    result = run_study(cfg, log=lines.append)
    said = [x for x in lines if "not your --set moe.group_mode=batch" in x]
    assert said and "expert_choice" in said[0] and "causal" in said[0], lines
    report = (tmp_path / "report.md").read_text()
    assert "What ran, per router" in report and "`moe.group_mode='position'`" in report
    assert "**token_choice**: the base configuration" in report
    assert result.settings["expert_choice"]["moe.group_mode"] == "position"


def _run(name, loss, accuracy):
    return SimpleNamespace(
        variant=SimpleNamespace(name=name), error=None, group_mode="batch", final={"loss": loss, "accuracy": accuracy}
    )


def test_ties_are_broken_by_validation_loss_and_missing_values_show_n_a():
    rows = leaderboard_rows([_run("a", 0.9, 0.5), _run("b", 0.7, 0.5), _run("c", 0.8, 0.6)], "vision")
    assert [r["router"] for r in rows] == ["c", "b", "a"]  # c best accuracy; b beats a on loss at equal accuracy
    assert _fmt({"router": "x"}, "load_cv", ".3f", "lm") == "n/a"
    assert _fmt({"router": "x", "load_cv": float("nan")}, "load_cv", ".3f", "lm") == "n/a"
