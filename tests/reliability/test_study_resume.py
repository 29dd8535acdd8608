"""Issue 14, item 6: a killed ``smoe study`` continues with ``--resume``: finished runs are kept, the interrupted
one resumes exactly from its checkpoint, and no restarted run appends to an old log."""

from __future__ import annotations

import json
import shutil

import pytest

from smoe.study import StudyConfig, run_study
from smoe.train.checkpoint import list_checkpoints

OVER = {"train.steps": "12", "train.eval_every": "4", "train.ckpt_every": "4", "train.keep_checkpoints": "0"}


def _cfg(out, **kw):
    return StudyConfig(task="lm", quick=True, routers=["token_choice", "hash"], out_dir=str(out), progress=False,
                       overrides=dict(OVER), **kw)  # fmt: skip


def _steps(run_dir):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["split"] == "train"]


def test_a_killed_study_resumes_keeping_finished_runs_and_continuing_the_interrupted_one(tmp_path):
    done = tmp_path / "done"
    run_study(_cfg(done), log=lambda s: None)
    # the same study as if killed during the second run, just after its step-6 record (checkpoint at step 4)
    killed = tmp_path / "killed"
    shutil.copytree(done, killed)
    (killed / "report.md").unlink()
    second = killed / "runs" / "hash-seed0"
    (second / "final.json").unlink()
    for ckpt in list_checkpoints(second):
        if int(ckpt.name.split("-")[1]) > 4:
            shutil.rmtree(ckpt)
    lines = (second / "metrics.jsonl").read_text().splitlines()
    kept = [x for x in lines if json.loads(x)["step"] <= 6]
    (second / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    first_final = (killed / "runs" / "token_choice-seed0" / "final.json").read_bytes()

    with pytest.raises(ValueError, match="interrupted study; pass --resume"):
        run_study(_cfg(killed), log=lambda s: None)
    lines_seen = []
    result = run_study(_cfg(killed, resume=True), log=lines_seen.append)
    assert any("(kept)" in x for x in lines_seen) and any("(resumed)" in x for x in lines_seen), lines_seen
    assert (killed / "runs" / "token_choice-seed0" / "final.json").read_bytes() == first_final
    assert _steps(second) == list(range(1, 13))  # each step logged once
    want = json.loads((done / "runs" / "hash-seed0" / "final.json").read_text())
    got = json.loads((second / "final.json").read_text())
    assert got["loss"] == want["loss"]  # exact resume
    assert (killed / "report.md").exists() and len(result.leaderboard) == 2


def test_resume_needs_a_study_to_continue(tmp_path):
    with pytest.raises(ValueError, match="no study.json"):
        run_study(_cfg(tmp_path / "nothing", resume=True), log=lambda s: None)
