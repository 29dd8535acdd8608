"""Expert parallelism: two gloo processes with the all-to-all dispatcher equal one process, float64.

Each rank routes its own tokens (``x[rank]``) through an ``smoe.MoE`` that holds half of the experts. The
one-process reference is the full layer run on each rank's tokens separately, so on every rank:

* the output and the input gradient equal the reference on that rank's tokens;
* the router's gradient (replicated parameters, no data-parallel reduction here) equals that rank's reference;
* each local expert's weight gradient equals the *sum over ranks* of the reference gradients of that expert (its
  rows come from both ranks).

The processes are spawned inside the test (``torch.multiprocessing``, one thread each), with a process-group
timeout and a bounded wait: a hang fails the test instead of the CI run. All cases run in one world (one spawn);
each case is then asserted on its own.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from world import run_ranks, run_world

import smoe
from smoe.engine import AllToAllDispatcher, shard_expert_state

pytestmark = pytest.mark.world_size

F64 = torch.float64
WORLD = 2
B, L, D, F, E, K = 2, 6, 8, 16, 4, 2
VOCAB = 50

CASES = {
    "token_choice": dict(router="token_choice"),
    "token_choice_capacity": dict(router="token_choice", capacity_factor=0.75),
    "token_choice_gelu_bias": dict(router="token_choice", experts="gelu", expert_bias=True),
    "expert_choice": dict(router="expert_choice", capacity_factor=1.5),
    "sinkhorn": dict(router="sinkhorn"),
    "hash": dict(router="hash"),
    "similarity": dict(router="similarity"),
    "shared_expert_gated": dict(router="token_choice", shared_expert_hidden_dim=12, shared_expert_gate=True),
    "module_experts": dict(router="token_choice", experts="module"),
    # every token routed to rank 0's experts: rank 1 receives no row, and its experts get zero gradients
    "one_rank_idle": dict(router="token_choice", router_kwargs={"gate_bias": True}),
}


def _module_experts(n: int) -> smoe.ModuleExperts:
    mods = [torch.nn.Sequential(torch.nn.Linear(D, F), torch.nn.Tanh(), torch.nn.Linear(F, D)) for _ in range(n)]
    return smoe.ModuleExperts(mods, dim=D).to(F64)


def _layer(kwargs: dict, dispatcher=None) -> smoe.MoE:
    kwargs = dict(kwargs)
    num_local = E if dispatcher is None else dispatcher.num_local_experts(E)
    if kwargs.get("experts") == "module":
        kwargs["experts"] = _module_experts(num_local)
    return smoe.MoE(D, F, E, K, dtype=F64, dispatcher=dispatcher or "local", **kwargs)


def _inputs(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(B, L, D, dtype=F64, generator=g)
    ids = torch.randint(0, VOCAB, (B, L), generator=g)
    gy = torch.randn(B, L, D, dtype=F64, generator=g)
    return x, ids, gy


def _run(layer, x, ids, gy):
    x = x.detach().clone().requires_grad_(True)
    y, aux = layer(x, token_ids=ids)
    names, params = zip(*layer.named_parameters())
    grads = torch.autograd.grad((y * gy).sum() + aux.loss, [x, *params], allow_unused=True)
    grads = {n: (torch.zeros_like(p) if g is None else g) for n, p, g in zip(["input", *names], [x, *params], grads)}
    return y.detach(), grads


def _case(kwargs: dict, rank: int, device: str = "cpu") -> dict[str, float]:
    """Max abs differences between the expert-parallel layer on this rank and the one-process reference."""
    torch.manual_seed(0)  # the same full layer on every rank
    full = _layer(kwargs).train().to(device)
    if "gate_bias" in kwargs.get("router_kwargs", {}):
        with torch.no_grad():
            full.router.gate.bias.copy_(torch.tensor([30.0, 30.0, -30.0, -30.0]))

    def inputs(r):
        return [t.to(device) for t in _inputs(r)]

    refs = [_run(full, *inputs(r)) for r in range(WORLD)]
    dispatcher = AllToAllDispatcher()
    first, count = dispatcher.first_local_expert(E), dispatcher.num_local_experts(E)
    ep = _layer(kwargs, dispatcher).train().to(device)
    ep.load_state_dict(shard_expert_state(full.state_dict(), E, first, count))
    y, grads = _run(ep, *inputs(rank))
    y_ref, g_ref = refs[rank]
    errors = {"output": (y - y_ref).abs().max().item()}
    for name, g in grads.items():
        if name.startswith("experts."):  # summed over the ranks' tokens, then this rank's slice
            total = {k: sum(r[1][k] for r in refs) for k in refs[0][1] if k.startswith("experts.")}
            want = shard_expert_state(total, E, first, count)[name]
        else:
            want = g_ref[name]
        errors[name] = (g - want).abs().max().item() if g.numel() else 0.0
    return errors


def _worker(rank: int, init_file: str, out_dir: str, cases: list[str], backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    device = "cpu"
    if backend == "nccl":  # one GPU per rank
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        results = {}
        for name in cases:
            try:
                results[name] = _case(CASES[name], rank, device)
            except Exception as e:  # reported per case by the test
                results[name] = {"error": f"{type(e).__name__}: {e}"}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ep")
    run_world(_worker, (str(tmp / "init"), str(tmp), sorted(CASES)))
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _check_case(world_results: list[dict], case: str) -> None:
    for rank, results in enumerate(world_results):
        errors = results[case]
        assert "error" not in errors, f"rank {rank}: {errors.get('error')}"
        assert {"output", "input"} <= errors.keys()
        assert any(k.startswith("experts.") for k in errors)
        if smoe.get_router(CASES[case]["router"]).differentiable:  # hash routing has no trainable parameter
            assert any(k.startswith("router.") for k in errors)
        bad = {k: v for k, v in errors.items() if not v <= 1e-10}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_equal_one_process(world_results, case):
    _check_case(world_results, case)


@pytest.fixture(scope="module")
def nccl_results(tmp_path_factory) -> list[dict]:
    if torch.cuda.device_count() < WORLD or not dist.is_nccl_available():
        pytest.skip(f"NCCL expert parallelism needs {WORLD} CUDA devices (one per rank)")
    tmp = tmp_path_factory.mktemp("ep_nccl")
    run_world(_worker, (str(tmp / "init"), str(tmp), sorted(CASES), "nccl"))
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_equal_one_process_over_nccl(nccl_results, case):
    """The same cases with NCCL, one CUDA device per rank (float64 on the GPU)."""
    _check_case(nccl_results, case)


def _global_worker(rank: int, init_file: str, out_dir: str) -> None:
    """The global balance loss and the reduced loads, against one process holding both ranks' tokens."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        full = _layer({}).train()  # one group of all tokens: the "group" loss is the global one
        x_all = torch.cat([_inputs(r)[0] for r in range(WORLD)])
        y, aux = full(x_all)
        (g_ref,) = torch.autograd.grad(aux.losses["balance"], [full.router.gate.weight])
        dispatcher = AllToAllDispatcher()
        ep = _layer({"router_kwargs": {"balance_loss_scope": "global"}}, dispatcher).train()
        first, count = dispatcher.first_local_expert(E), dispatcher.num_local_experts(E)
        ep.load_state_dict(shard_expert_state(full.state_dict(), E, first, count))
        y_r, aux_r = ep(_inputs(rank)[0])
        (g_r,) = torch.autograd.grad(aux_r.losses["balance"], [ep.router.gate.weight])
        mean = torch.stack([aux_r.losses["balance"].detach(), *g_r.reshape(-1)])
        dist.all_reduce(mean)  # what data-parallel averaging of the ranks' losses and gradients sees
        mean /= WORLD
        out = {
            "loss": abs(mean[0].item() - aux.losses["balance"].item()),
            "grad": (mean[1:] - g_ref.reshape(-1)).abs().max().item(),
            "loss_is_not_local": abs(aux_r.losses["balance"].item() - aux.losses["balance"].item()),
            "load": (aux_r.stats["tokens_per_expert"] - aux.stats["tokens_per_expert"]).abs().max().item(),
            "local_load_total": int(aux_r.stats["tokens_per_expert_local"].sum()),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_global_balance_loss_and_loads_equal_one_process_holding_every_rank(tmp_path):
    run_world(_global_worker, (str(tmp_path / "init"), str(tmp_path)))
    for r in range(WORLD):
        out = json.loads((tmp_path / f"rank{r}.json").read_text())
        # the mean of the ranks' losses and gradients (router math is float32: float32 rounding of other sums)
        assert out["loss"] < 1e-6 and out["grad"] < 1e-6, out
        assert out["loss_is_not_local"] > 1e-6, out  # each rank's own loss differs: the reduction mattered
        assert out["load"] == 0 and out["local_load_total"] == B * L * K, out  # loads summed over the ranks


def _state_worker(rank: int, init_file: str, out_dir: str) -> None:
    """gather_expert_state / shard_model_state on module experts, one of which has no optimizer state on rank 1."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(_layer({"experts": "module"}))
        full = {k: v.clone() for k, v in model.state_dict().items()}
        smoe.layers.apply_expert_parallel(model)
        local = model.state_dict()
        back = smoe.layers.gather_expert_state(model, local)
        out = {
            "keys_equal": sorted(back) == sorted(full),
            "values_equal": all(torch.equal(back[k], full[k]) for k in full),
            "local_is_slice": all(
                torch.equal(v, smoe.layers.shard_model_state(model, full)[k]) for k, v in local.items()
            ),
        }
        moments = {k: torch.full_like(v, float(rank + 1)) for k, v in local.items() if k.startswith("0.experts.")}
        if rank == 1:
            moments.pop("0.experts.0.0.weight")  # no state yet for this expert's weight on rank 1
        gathered = smoe.layers.gather_expert_state(model, moments)
        out["filled"] = [gathered[f"0.experts.{e}.0.weight"].abs().max().item() for e in range(E)]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_expert_state_gathers_to_the_one_process_form_and_shards_back(tmp_path):
    run_world(_state_worker, (str(tmp_path / "init"), str(tmp_path)))
    for r in range(WORLD):
        out = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert out["keys_equal"] and out["values_equal"] and out["local_is_slice"], out
        assert out["filled"] == [1.0, 1.0, 0.0, 2.0], out  # rank 1's missing expert 2 is zeros (fresh state)


def _dense_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        layer = smoe.MoE(D, F, E, 1, router="soft", dispatcher=AllToAllDispatcher(), dtype=F64)
        try:
            layer(torch.randn(B, L, D, dtype=F64))
            message = "no error"
        except ValueError as e:
            message = str(e)
        Path(out_dir, f"rank{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


def test_dense_plans_are_refused_with_a_clear_error(tmp_path):
    run_world(_dense_worker, (str(tmp_path / "init"), str(tmp_path)))
    for r in range(WORLD):
        assert "dense (Soft MoE) plan" in (tmp_path / f"rank{r}.txt").read_text()


def _fault_worker(rank: int, init_file: str, out_dir: str, fault: str) -> None:
    """Rank 1 misbehaves (``fault``); rank 0 records how its next forward ends, and how long that took."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=5)
    )
    top_k = 1 if fault == "mismatch" and rank == 1 else K
    try:
        layer = smoe.MoE(D, F, E, top_k, dispatcher="all_to_all")
    except ValueError as e:
        Path(out_dir, f"rank{rank}.txt").write_text(f"ValueError at start-up: {e}")
        os._exit(0)  # recorded; skip the process group's teardown (it may abort while the peer already left)
    if rank == 1:
        if fault == "exit":
            os._exit(3)  # dies without a word: no shutdown, no exception
        if fault == "raise":
            raise RuntimeError("rank 1 fails on purpose")
        if fault == "stall":
            time.sleep(12)  # alive, but never reaches the exchange within the 5 s timeout
            return
    t0 = time.monotonic()
    try:
        layer(torch.randn(5, D))
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    Path(out_dir, f"rank{rank}.txt").write_text(f"{time.monotonic() - t0:.1f}s {message}")
    # after a timed-out collective, gloo's process-group destructor aborts the interpreter at exit; the error has
    # been raised and recorded, which is what is tested, so leave without running destructors
    os._exit(0)


@pytest.mark.parametrize("fault", ["exit", "raise", "stall"])
def test_a_rank_that_dies_or_stalls_ends_the_others_with_an_error(tmp_path, fault):
    codes = run_ranks(_fault_worker, (str(tmp_path / "init"), str(tmp_path), fault), timeout_s=90)
    assert codes[0] == 0, f"rank 0 did not end by itself: exit codes {codes}"
    seconds, message = (tmp_path / "rank0.txt").read_text().split(" ", 1)
    assert "expert parallelism: rank 0 of 2" in message and "failed" in message, message
    assert float(seconds[:-1]) < 30, f"rank 0 waited {seconds}"  # the 5 s process-group timeout, not a hang


def test_ranks_that_built_different_layers_are_refused_at_start_up(tmp_path):
    codes = run_ranks(_fault_worker, (str(tmp_path / "init"), str(tmp_path), "mismatch"), timeout_s=90)
    assert codes == [0, 0]
    for r in range(WORLD):
        message = (tmp_path / f"rank{r}.txt").read_text()
        assert message.startswith("ValueError at start-up") and "ranks [1] built a different MoE layer" in message


def test_without_a_process_group_the_dispatcher_is_refused():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        smoe.MoE(D, F, E, K, dispatcher="all_to_all")


def test_shard_expert_state_slices_stacked_and_module_experts():
    torch.manual_seed(0)
    stacked = smoe.MoE(D, F, E, K, shared_expert_hidden_dim=4).state_dict()
    part = shard_expert_state(stacked, E, 2, 2)
    assert torch.equal(part["experts.w1_EFD"], stacked["experts.w1_EFD"][2:4])
    assert torch.equal(part["router.gate.weight"], stacked["router.gate.weight"])  # replicated
    assert torch.equal(part["shared_expert.w1.weight"], stacked["shared_expert.w1.weight"])
    modules = smoe.MoE(D, None, E, K, experts=_module_experts(E)).state_dict()
    part = shard_expert_state(modules, E, 2, 2)
    assert sorted(k for k in part if k.startswith("experts.")) == sorted(
        f"experts.{e}.{p}" for e in (0, 1) for p in ("0.weight", "0.bias", "2.weight", "2.bias")
    )
    assert torch.equal(part["experts.1.2.weight"], modules["experts.3.2.weight"])
    with pytest.raises(ValueError, match="expected 8"):
        shard_expert_state(stacked, 8, 0, 4)


def test_the_reference_backend_refuses_a_sharding_dispatcher(monkeypatch):
    class Sharded(smoe.Dispatcher):
        def num_local_experts(self, num_experts):
            return num_experts

    layer = smoe.MoE(D, F, E, K, dispatcher=Sharded(), backend="reference")
    with pytest.raises(ValueError, match="backend='reference' runs every expert in this process"):
        layer(torch.randn(3, D))
