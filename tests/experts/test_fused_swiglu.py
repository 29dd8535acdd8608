"""The fused SwiGLU engine op and the reused CPU buffers: gradients, autograd corner cases, memory safety.

The layer-level fast == reference checks are in ``test_equivalence.py``; here the op is driven directly, against
the reference engine in float64, in the situations the layer tests do not reach: inputs that do not need
gradients, empty plans, double backward with ``retain_graph``, several graphs alive at once, and gradient
buffers that the pool hands out again.
"""

import pytest
import torch

import smoe
from smoe.engine import LocalDispatcher
from smoe.engine.reference import run_sparse_reference
from smoe.experts import SwiGLUExperts as Experts
from smoe.experts import buffers
from smoe.experts.fused_swiglu import swiglu_experts
from smoe.experts.kernels import HAS_GROUPED_MM, choose_kernel
from smoe.routing.plan import SparsePlan, sparse_plan_from_topk

F64 = torch.float64


def _plan(T, E, K, generator=None, counts_zero=()):
    """A random sorted plan; experts in ``counts_zero`` get no rows."""
    scores = torch.rand(T, E, generator=generator, dtype=F64)
    scores[:, list(counts_zero)] = -1.0
    expert_TK = scores.topk(K, dim=-1).indices
    weight_TK = torch.rand(T, K, generator=generator, dtype=F64)
    return sparse_plan_from_topk(expert_TK, weight_TK, E)


def _run(kernel, x, plan, experts, weight_N):
    return swiglu_experts(
        x,
        experts.w1_EFD,
        experts.w3_EFD,
        experts.w2_EDF,
        plan.counts_E,
        kernel,
        source_idx_N=plan.gather_idx_N,
        token_idx_N=plan.token_idx_N,
        weight_N=weight_N,
        num_tokens=plan.num_tokens,
    )


def _with_weight(plan, weight_N):
    return SparsePlan(
        token_idx_N=plan.token_idx_N,
        expert_idx_N=plan.expert_idx_N,
        weight_N=weight_N,
        counts_E=plan.counts_E,
        num_tokens=plan.num_tokens,
        num_requested=plan.num_requested,
    )


@pytest.mark.parametrize(
    "needs", ["all", "no_x", "no_weight", "only_w2", "only_x", "only_weight", "weight_and_w1", "none"]
)
def test_loop_kernel_gradients_match_reference(needs):
    T, E, K, D, F = 9, 5, 2, 8, 12
    plan = _plan(T, E, K, counts_zero=(3,))
    experts = Experts(D, F, E, dtype=F64)
    x = torch.randn(T, D, dtype=F64)
    weight_N = plan.weight_N.clone()
    flags = {
        "all": (True, True, True, True, True),
        "no_x": (False, True, True, True, True),
        "no_weight": (True, False, True, True, True),
        "only_w2": (False, False, False, False, True),
        "only_x": (True, False, False, False, False),
        "only_weight": (False, True, False, False, False),
        "weight_and_w1": (False, True, True, False, False),
        "none": (False, False, False, False, False),
    }[needs]
    leaves = [x, weight_N, experts.w1_EFD, experts.w3_EFD, experts.w2_EDF]
    for t, flag in zip(leaves, flags):
        t.requires_grad_(flag)
    wanted = [t for t in leaves if t.requires_grad]
    gy = torch.randn(T, D, dtype=F64)
    y_ref = run_sparse_reference(x, _with_weight(plan, weight_N), experts)
    y_fast = _run("loop", x, plan, experts, weight_N)
    torch.testing.assert_close(y_fast, y_ref)
    if not wanted:
        assert not y_fast.requires_grad
        return
    g_ref = torch.autograd.grad((y_ref * gy).sum(), wanted)
    g_fast = torch.autograd.grad((y_fast * gy).sum(), wanted)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b)
    if experts.w1_EFD.requires_grad:  # expert 3 had no rows: exactly zero, not uninitialised memory
        i = next(i for i, t in enumerate(wanted) if t is experts.w1_EFD)
        assert torch.equal(g_fast[i][3], torch.zeros(F, D, dtype=F64))


@pytest.mark.parametrize("kernel", ["loop"] + (["grouped_mm"] if HAS_GROUPED_MM else []))
def test_empty_plan(kernel):
    E, D, F, T = 4, 16, 32, 5
    dtype = F64 if kernel == "loop" else torch.float32
    experts = Experts(D, F, E, dtype=dtype)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    none = torch.zeros(0, dtype=torch.long)
    weight_N = torch.zeros(0, dtype=dtype, requires_grad=True)
    y = swiglu_experts(
        x,
        experts.w1_EFD,
        experts.w3_EFD,
        experts.w2_EDF,
        torch.zeros(E, dtype=torch.long),
        kernel,
        source_idx_N=none,
        token_idx_N=none,
        weight_N=weight_N,
        num_tokens=T,
    )
    assert torch.equal(y, torch.zeros(T, D, dtype=dtype))
    grads = torch.autograd.grad(y.sum(), [x, weight_N, *experts.parameters()])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_no_grad_forward_equals_grad_forward():
    layer = smoe.MoE(8, 16, 4, 2, dtype=F64)
    x = torch.randn(3, 5, 8, dtype=F64)
    y_grad, _ = layer(x)
    with torch.no_grad():
        y_plain, _ = layer(x)
    torch.testing.assert_close(y_plain, y_grad.detach(), rtol=0, atol=0)


def test_retain_graph_double_backward_accumulates():
    layer = smoe.MoE(8, 16, 4, 2, dtype=F64)
    x = torch.randn(7, 8, dtype=F64, requires_grad=True)
    y, _ = layer(x)
    y.sum().backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in layer.named_parameters()}
    y.sum().backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, 2 * first[n], msg=n)


@pytest.fixture
def pool():
    """The buffer pool on, with a threshold small enough for test-sized tensors; restored afterwards."""
    old = buffers.MIN_BYTES
    buffers.MIN_BYTES = 1
    buffers.clear()
    buffers.set_enabled(True)
    yield buffers
    buffers.MIN_BYTES = old
    buffers.set_enabled(None)
    buffers.clear()


def test_pool_reuses_only_free_memory(pool):
    w = torch.empty(4, 8, 16)
    a = pool.empty_grad(w)
    b = pool.empty_grad(w)
    assert a.data_ptr() != b.data_ptr()  # a is alive
    ptr = a.data_ptr()
    view = a.view(-1)
    del a
    c = pool.empty_grad(w)
    assert c.data_ptr() != ptr  # a view still uses the memory
    del view
    d = pool.empty_grad(w)
    assert d.data_ptr() == ptr and d.shape == w.shape and d.is_contiguous()
    assert d._use_count() == 1  # a fresh alias: autograd can steal it as .grad without copying


def test_pool_saved_buffers_drop_other_sizes(pool):
    owner = torch.empty(3)
    a = pool.empty_saved((10, 4), owner)
    del a
    b = pool.empty_saved((12, 4), owner)  # a miss drops the free (10, 4) buffer
    assert pool.pooled_bytes() == 12 * 4 * 4 and b.shape == (12, 4)


def test_pool_memory_goes_with_its_owner(pool):
    import gc

    owner = torch.nn.Parameter(torch.empty(4, 8, 16))
    g = pool.empty_grad(owner)
    assert pool.pooled_bytes() == g.numel() * 4
    del owner
    gc.collect()
    assert pool.pooled_bytes() == 0


def _layer_grads(layer, x):
    y, aux = layer(x)
    (y.square().sum() + aux.loss).backward()
    return {n: p.grad.clone() for n, p in layer.named_parameters()}


def test_pool_training_loop_gradients(pool):
    """zero_grad(set_to_none) reuses the memory; kept grads accumulate correctly; returned grads stay intact."""
    torch.manual_seed(0)
    layer = smoe.MoE(8, 16, 4, 2, dtype=F64)
    ref = smoe.MoE(8, 16, 4, 2, dtype=F64, backend="reference")
    ref.load_state_dict(layer.state_dict())
    xs = [torch.randn(6, 8, dtype=F64) for _ in range(3)]
    ptrs = []
    for x in xs:
        layer.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        got, want = _layer_grads(layer, x), _layer_grads(ref, x)
        for n in want:
            torch.testing.assert_close(got[n], want[n], msg=n)
        ptrs.append(layer.experts.w1_EFD.grad.data_ptr())
    assert ptrs[1] == ptrs[2]  # steady state: the same memory every step
    # gradients kept across backward passes (no zero_grad) accumulate, although the pool is in use
    layer.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    for x in xs:
        layer(x)[0].square().sum().backward()
        ref(x)[0].square().sum().backward()
    for (n, p), q in zip(layer.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    # gradients returned by autograd.grad and held by the caller are never overwritten by later calls
    held = [torch.autograd.grad(layer(x)[0].sum(), list(layer.experts.parameters())) for x in xs]
    copies = [[g.clone() for g in gs] for gs in held]
    for x in xs:
        torch.autograd.grad(layer(x)[0].sum(), list(layer.experts.parameters()))
    for gs, cs in zip(held, copies):
        for g, c in zip(gs, cs):
            assert torch.equal(g, c)


def test_pool_two_graphs_alive(pool):
    """Two forwards before either backward: the saved activations of the first are not reused by the second."""
    layer = smoe.MoE(8, 16, 4, 2, dtype=F64)
    ref = smoe.MoE(8, 16, 4, 2, dtype=F64, backend="reference")
    ref.load_state_dict(layer.state_dict())
    x1, x2 = torch.randn(6, 8, dtype=F64), torch.randn(6, 8, dtype=F64)
    y1, y2 = layer(x1)[0], layer(x2)[0]
    (y1.square().sum() + 3 * y2.square().sum()).backward()
    r1, r2 = ref(x1)[0], ref(x2)[0]
    (r1.square().sum() + 3 * r2.square().sum()).backward()
    for (n, p), q in zip(layer.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_pool_switch_off(monkeypatch):
    monkeypatch.setenv("SMOE_REUSE_BUFFERS", "0")
    assert not buffers.is_enabled()
    monkeypatch.setenv("SMOE_REUSE_BUFFERS", "1")
    assert buffers.is_enabled()


def test_choose_kernel():
    x32, w32 = torch.empty(4, 16), torch.empty(2, 16, 16)
    assert choose_kernel("auto", x32, w32) == "loop"  # CPU: measured faster
    assert choose_kernel("loop", x32, w32) == "loop"
    assert choose_kernel("grouped_mm", x32.double(), w32.double()) == "loop"  # no float64 grouped_mm kernel
    if HAS_GROUPED_MM:
        assert choose_kernel("grouped_mm", x32, w32) == "grouped_mm"


def test_large_finite_input_is_accepted():
    """The input check sums first; an overflowing sum of finite values must not be mistaken for Inf."""
    layer = smoe.MoE(8, 16, 4, 2)
    x = torch.full((4, 8), 3e38)
    layer(x)  # no ValueError
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(x)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="this torch has no torch._grouped_mm")
def test_dense_plan_grouped_mm_kernel_matches_float64_reference():
    """The fused op without gather and combine (Soft-MoE slots), on the grouped_mm kernel."""
    from smoe.engine import run_dense_reference
    from smoe.routing.plan import DensePlan

    def run_dense_fast(x, plan, experts, kernel):  # the local dispatcher's dense path (slot mixing + experts)
        return LocalDispatcher().run(x, plan, experts, kernel=kernel)

    G, S, E, C, D = 2, 5, 3, 2, 8
    experts32 = Experts(D, 16, E)
    experts64 = Experts(D, 16, E, dtype=F64)
    experts64.load_state_dict({k: v.double() for k, v in experts32.state_dict().items()})
    x = torch.randn(G * S, D)
    logits = torch.randn(G, S, E, C)
    gy = torch.randn(G * S, D)

    def grads(run, experts, dtype, kernel=None):
        xx, ll = x.to(dtype).requires_grad_(True), logits.to(dtype).requires_grad_(True)
        plan = DensePlan(dispatch_GSEC=ll.softmax(1), combine_GSEC=ll.flatten(2).softmax(-1).view(G, S, E, C))
        y = run(xx, plan, experts) if kernel is None else run(xx, plan, experts, kernel=kernel)
        return [y, *torch.autograd.grad((y * gy.to(dtype)).sum(), [xx, ll, *experts.parameters()])]

    got = grads(run_dense_fast, experts32, torch.float32, "grouped_mm")
    want = grads(run_dense_reference, experts64, F64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.float(), atol=2e-5, rtol=2e-4)


def test_autocast_bf16_fast_close_to_reference():
    """Under CPU bf16 autocast the fused op gets bf16 copies of the weights; gradients reach the fp32 parameters."""
    layer = smoe.MoE(16, 32, 4, 2)
    with torch.no_grad():
        layer.router.gate.weight.mul_(20)  # decisive routing: bf16 noise cannot flip a choice
    x = torch.randn(12, 16)
    out = {}
    for backend in ("reference", "auto"):
        layer.zero_grad(set_to_none=True)
        with smoe.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            y, aux = layer(x)
        (y.float().square().sum() + aux.loss).backward()
        out[backend] = (y.float(), {n: p.grad.clone() for n, p in layer.named_parameters()})
    y_ref, g_ref = out["reference"]
    y_fast, g_fast = out["auto"]
    torch.testing.assert_close(y_fast, y_ref, atol=2e-2, rtol=2e-2)
    for n in g_ref:
        assert g_fast[n].dtype == torch.float32
        torch.testing.assert_close(g_fast[n], g_ref[n], atol=5e-2, rtol=5e-2, msg=n)
