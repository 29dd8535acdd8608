"""Training on two gloo processes equals training in one, and checkpoints move between process counts.

``lm_debug`` (4 experts, top-2, dropless) with the global balance-loss scope, 20 steps of 8 sequences:

* two ranks with the experts sharded (EP=2), two ranks of plain data parallelism (EP=1, DDP) and four ranks in
  two expert groups of two (EP=2 < W=4: each expert's gradient is summed over its two copies) give the
  one-process losses at every step (float32 rounding of differently ordered sums only), and a run repeated on the
  same world gives the same losses exactly;
* a run saved at step 10 by one process resumes on two (EP=2) and the reverse, and steps 11..20 match the
  uninterrupted run;
* a rank that dies in the middle of training ends the other with an error naming its rank within the
  process-group timeout; under ``smoe train --expert-parallel 2`` (torchrun) a worker killed with SIGKILL ends
  the job with a non-zero status.

The processes are spawned inside the tests with bounded waits (:mod:`world`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from world import run_ranks, run_world

from smoe.train.parallel import ParallelContext, init_parallel
from smoe.train.run import resolve_run_config, train_run

pytestmark = pytest.mark.world_size

STEPS = 20
OVERRIDES = {
    "moe.router_kwargs": '{"balance_loss_scope": "global"}',
    "train.steps": str(STEPS),
    "train.batch_size": "8",
    "train.eval_batches": "2",
    "train.ckpt_every": "10",
}
TOL = 2e-5  # float32 losses of ~5; the sums run in another order on two ranks


def _losses(run_dir) -> dict[int, float]:
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == len({r["step"] for r in train}), "a step was logged twice"
    return {r["step"]: r["loss"] for r in train}


def _truncated_copy(src: Path, dst: Path, step: int) -> Path:
    """``src`` as it was right after its checkpoint at ``step`` (later checkpoints removed)."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    return dst


def _world_worker(rank: int, init_file: str, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        for ep in (2, 1):  # experts sharded over both ranks; plain data parallelism (DDP over everything)
            ctx = init_parallel(ep, timeout_s=60)
            assert (ctx.world_size, ctx.expert_parallel) == (2, ep)
            train_run(resolve_run_config("lm_debug", OVERRIDES), Path(tmp, f"ep{ep}"), progress=False, parallel=ctx)
        # the same run again: deterministic given the seed and the world
        train_run(resolve_run_config("lm_debug", OVERRIDES), Path(tmp, "ep2_again"), progress=False,
                  parallel=init_parallel(2, timeout_s=60))  # fmt: skip
        # the one-process run's checkpoint at step 10, continued on two ranks
        ctx = init_parallel(2, timeout_s=60)
        train_run(None, Path(tmp, "one_then_two"), resume=True, progress=False, parallel=ctx)
    finally:
        dist.destroy_process_group()


def _four_worker(rank: int, init_file: str, tmp: str) -> None:
    """Four ranks: two expert groups of two (each expert on two ranks, its gradient summed over both copies)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=4,
                            timeout=timedelta(seconds=90))  # fmt: skip
    try:
        ctx = init_parallel(2, timeout_s=90)
        assert (ctx.data_parallel, ctx.expert_parallel) == (2, 2)
        overrides = dict(OVERRIDES, **{"train.ckpt_every": "0"})
        train_run(resolve_run_config("lm_debug", overrides), Path(tmp, "dp2_ep2"), progress=False, parallel=ctx)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("parallel")
    train_run(resolve_run_config("lm_debug", OVERRIDES), tmp / "one", progress=False)
    _truncated_copy(tmp / "one", tmp / "one_then_two", 10)
    run_world(_world_worker, (str(tmp / "init"), str(tmp)), timeout_s=240)
    run_world(_four_worker, (str(tmp / "init4"), str(tmp)), timeout_s=240, world=4)
    train_run(None, _truncated_copy(tmp / "ep2", tmp / "two_then_one", 10), resume=True, progress=False)
    return tmp


def test_a_multi_process_run_is_deterministic(runs):
    assert _losses(runs / "ep2") == _losses(runs / "ep2_again")


@pytest.mark.parametrize("run", ["ep2", "ep1", "dp2_ep2"])
def test_several_processes_train_the_one_process_losses(runs, run):
    one, two = _losses(runs / "one"), _losses(runs / run)
    assert sorted(two) == list(range(1, STEPS + 1))
    assert one[STEPS] < one[1] - 0.3  # it trained
    diffs = {s: abs(one[s] - two[s]) for s in one}
    assert max(diffs.values()) < TOL, diffs
    final_one = json.loads((runs / "one" / "final.json").read_text())
    final_two = json.loads((runs / run / "final.json").read_text())
    assert abs(final_one["loss"] - final_two["loss"]) < TOL
    world = 4 if run == "dp2_ep2" else 2
    assert (final_two["world_size"], final_two["expert_parallel"]) == (world, int(run[-1]))
    assert final_two["num_parameters"] == final_one["num_parameters"]  # counted over the whole model


def test_checkpoints_hold_every_expert_whatever_the_process_count(runs):
    from safetensors.torch import load_file

    one = load_file(str(runs / "one" / "checkpoints" / "step-00000010" / "model.safetensors"))
    two = load_file(str(runs / "ep2" / "checkpoints" / "step-00000010" / "model.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        assert one[k].shape == two[k].shape, k
        assert torch.allclose(one[k], two[k], atol=1e-5), k
    opt = load_file(str(runs / "ep2" / "checkpoints" / "step-00000010" / "optimizer.safetensors"))
    moments = [k for k in opt if k.startswith("optim.") and "experts.w1_EFD" in k and k.endswith("exp_avg")]
    assert moments and all(opt[k].shape[0] == 4 for k in moments)  # all 4 experts, not one rank's 2
    state = json.loads((runs / "ep2" / "checkpoints" / "step-00000010" / "state.json").read_text())
    assert state["world"] == {"world_size": 2, "expert_parallel": 2}
    assert "rng.torch.rank1" in opt


@pytest.mark.parametrize("run", ["one_then_two", "two_then_one"])
def test_a_run_saved_on_one_process_count_resumes_on_another(runs, run):
    one, resumed = _losses(runs / "one"), _losses(runs / run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    diffs = {s: abs(one[s] - resumed[s]) for s in range(11, STEPS + 1)}
    assert max(diffs.values()) < TOL, diffs


def _dying_worker(rank: int, init_file: str, tmp: str) -> None:
    """Rank 1 exits without a word after step 3; rank 0 records how its training ends and how long it took."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=10)
    )
    ctx = init_parallel(2, timeout_s=10)
    clock = {}

    def on_step(trainer, record):
        clock["t"] = time.monotonic()
        if rank == 1 and record["step"] == 3:
            os._exit(3)

    overrides = dict(OVERRIDES, **{"train.steps": "50", "train.ckpt_every": "0"})
    try:
        train_run(resolve_run_config("lm_debug", overrides), None, progress=False, on_step=on_step, parallel=ctx)
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    Path(tmp, f"rank{rank}.txt").write_text(f"{time.monotonic() - clock['t']:.1f}s {message}")
    os._exit(0)  # the group cannot shut down cleanly with a peer gone


def test_a_rank_that_dies_in_training_ends_the_other_with_an_error_naming_it(tmp_path):
    codes = run_ranks(_dying_worker, (str(tmp_path / "init"), str(tmp_path)), timeout_s=120)
    assert codes[1] == 3 and codes[0] == 0, codes
    seconds, message = (tmp_path / "rank0.txt").read_text().split(" ", 1)
    assert "rank 0 of 2: training step 4 failed" in message or "expert parallelism: rank 0 of 2" in message, message
    assert float(seconds[:-1]) < 40, seconds  # bounded by the 10 s timeout, not a hang


def test_one_process_needs_no_process_group_and_refuses_expert_parallelism_without_one(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    ctx = init_parallel(1)
    assert ctx == ParallelContext() and not ctx.distributed and ctx.is_main
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        init_parallel(2)
    with pytest.raises(ValueError, match="positive integer"):
        init_parallel(0)
    with pytest.raises(ValueError, match="timeout"):
        init_parallel(1, timeout_s=float("inf"))


def _smoe(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "smoe", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def _cli_args(out: Path, steps: int) -> list[str]:
    return [
        "train",
        "--preset",
        "lm_debug",
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--no-progress",
        "--expert-parallel",
        "2",
        "--dist-timeout",
        "20",
        "--out",
        str(out),
        "--set",
        'moe.router_kwargs={"balance_loss_scope": "global"}',
        "--set",
        "train.eval_batches=2",
    ]


def test_smoe_train_expert_parallel_launches_torchrun_and_writes_one_run(tmp_path):
    proc = _smoe(*_cli_args(tmp_path / "run", 6))
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    assert "launching 2 processes" in out and out.count("final validation") == 1, out
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert (final["world_size"], final["expert_parallel"], final["step"]) == (2, 2, 6)
    assert sorted(_losses(tmp_path / "run")) == list(range(1, 7))


def _worker_pids(launcher: int) -> dict[int, int]:
    """``{rank: pid}`` of the torchrun workers below process ``launcher`` (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if "TORCHELASTIC_RUN_ID" in env and "RANK" in env:
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            grand = int((Path("/proc") / str(ppid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if grand == launcher:
                found[int(env["RANK"])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_a_killed_worker_ends_the_torchrun_job_with_an_error(tmp_path):
    proc = _smoe(*_cli_args(tmp_path / "run", 100000))
    try:
        deadline = time.monotonic() + 120
        metrics = tmp_path / "run" / "metrics.jsonl"
        while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 2):
            time.sleep(0.2)
        workers = _worker_pids(proc.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=90)
        assert time.monotonic() - t0 < 60
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", err) and "SIGKILL" in err, err[-3000:]  # torchrun's report


def test_accounting_counts_the_whole_model_when_its_experts_are_sharded():
    import smoe

    class Half(smoe.Dispatcher):
        def num_local_experts(self, num_experts):
            return num_experts // 2

    model = smoe.build_model("lm_debug")
    before = model.accounting()
    for m in model.modules():
        if isinstance(m, smoe.MoE):
            m.shard_experts(Half())
    assert sum(p.numel() for p in model.parameters()) < before["num_parameters"]
    assert model.accounting() == before


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--expert-parallel", "8", "--batch-size", "16"],
            "moe.num_experts=4 must be divisible by --expert-parallel 8",
        ),
        (["--nproc", "3"], "train.batch_size=16 must be divisible by --nproc 3"),
        (["--nproc", "2", "--expert-parallel", "4"], "--expert-parallel 4 must divide --nproc 2"),
    ],
)
def test_a_run_that_cannot_be_split_is_refused_before_any_process_starts(tmp_path, capsys, flags, message):
    from smoe.cli.main import main

    assert main(["train", "--preset", "lm_debug", "--out", str(tmp_path / "run"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
