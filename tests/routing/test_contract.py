"""The router contract, checked for every registered router (``smoe.list_routers()``): a new router file is tested
here automatically.

For each router, in training and in evaluation mode, with tiny float64 layers on CPU:

* the plan is valid (``plan.validate()``: sorted rows, consistent counts, finite weights) and the side outputs are
  well formed (finite scalar losses, ``probs_TE`` of shape ``(T, E)``, ``inputs_RD`` covering the rows the plan reads);
* evaluation is deterministic (same input -> same plan and output);
* the task loss reaches every router parameter when ``router.differentiable`` (and none when it is not);
* the fast engine equals the reference engine on the output and on the gradients of the input, of every router
  parameter and of every expert parameter (``backend="loop"``, ``"fast"`` -- the fused path where the experts
  offer it -- and ``"unfused"`` -- the seam ``dispatch -> experts -> combine`` -- vs ``backend="reference"``), in
  ``group_mode="batch"`` and ``"position"`` (the latter permutes tokens to ``(L, B)`` order);
* the same holds for every registered expert type, with and without biases, and for wrapped modules
  (:class:`smoe.ModuleExperts`), on both engine paths.

Every call passes ``token_ids=`` and ``attn_probs=`` (a causal attention computed from the input), so routers that
need context (hash, attention-aware) get it. Routers that are random in training (S2MoE's noise, random routing,
comparison's random partner) are compared under identical seeds.
"""

import pytest
import torch

import smoe
from smoe.routing.plan import DensePlan, SparsePlan

F64 = torch.float64
B, L, D, F, E, K = 2, 6, 8, 16, 4, 2
VOCAB = 50

#: router-specific constructor options the contract needs, by registry name (empty: every router works with its
#: defaults given token ids and attention probabilities).
ROUTER_KWARGS: dict[str, dict] = {}

ROUTERS = smoe.list_routers()


def causal_attention(x_BLD: torch.Tensor, num_heads: int = 2) -> torch.Tensor:
    """``(B, H, L, L)`` causal softmax attention computed from ``x`` (head h scales the scores by h + 1)."""
    Lx = x_BLD.shape[1]
    scores_BLL = x_BLD @ x_BLD.transpose(1, 2) / x_BLD.shape[-1] ** 0.5
    scale_H = torch.arange(1, num_heads + 1, dtype=x_BLD.dtype).view(1, -1, 1, 1)
    future = torch.ones(Lx, Lx, dtype=torch.bool).triu(1)
    return (scores_BLL.unsqueeze(1) * scale_H).masked_fill(future, float("-inf")).softmax(dim=-1)


def make_inputs(shape=(B, L, D)):
    """``x``, token ids and causal attention probabilities (``(B, H, L, L)``, or ``(T, T)`` for a 2-d input)."""
    x = torch.randn(*shape, dtype=F64)
    token_ids = torch.randint(0, VOCAB, shape[:-1])
    if x.dim() == 3:
        return x, token_ids, causal_attention(x)
    return x, token_ids, causal_attention(x.unsqueeze(0))[0, 0]


#: every expert type of the registry, with and without biases, and a wrapped module: (label, MoE keyword arguments)
EXPERT_VARIANTS = [
    (f"{name}{'+bias' if bias else ''}", lambda name=name, bias=bias: dict(experts=name, expert_bias=bias))
    for name in smoe.list_experts()
    for bias in (False, True)
] + [("module", lambda: dict(experts=module_experts()))]


def module_experts():
    """``E`` small ``nn.Sequential`` experts (tanh MLPs) wrapped as :class:`smoe.ModuleExperts`."""
    mods = [torch.nn.Sequential(torch.nn.Linear(D, F), torch.nn.Tanh(), torch.nn.Linear(F, D)) for _ in range(E)]
    return smoe.ModuleExperts(mods, dim=D).to(F64)


def make_layer(name, backend=None, group_mode="batch", **moe_kwargs):
    kw = ROUTER_KWARGS.get(name)
    return smoe.MoE(
        D, F, E, K, router=name, group_mode=group_mode, backend=backend, dtype=F64, router_kwargs=kw, **moe_kwargs
    )


def run(layer, x, token_ids, attn, seed=0):
    torch.manual_seed(seed)
    return layer(x, token_ids=token_ids, attn_probs=attn)


def batch_context(x, ids, attn):
    """The routing context an ``MoE`` in ``group_mode="batch"`` builds, for calling a router directly."""
    Bx, Lx = (1, x.shape[0]) if x.dim() == 2 else x.shape[:2]
    return smoe.RoutingContext(
        group_size=Bx * Lx, token_ids_T=ids.reshape(-1), attn_probs=attn, batch_shape=(Bx, Lx), group_mode="batch"
    )


@pytest.mark.parametrize("shape", [(B, L, D), (7, D)], ids=["BLD", "TD"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ROUTERS)
def test_plan_and_side_outputs_are_valid(name, training, shape):
    layer = make_layer(name).train(training)
    x, ids, attn = make_inputs(shape)
    T = x.numel() // D
    y, aux = run(layer, x, ids, attn)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    aux.plan.validate()
    assert aux.loss.dim() == 0 and bool(torch.isfinite(aux.loss))
    for loss_name, value in aux.losses.items():
        assert value.dim() == 0 and bool(torch.isfinite(value)), loss_name
    # the router called directly: plan form, probabilities, and the engine rows the plan reads
    router = layer.router
    assert isinstance(router.couples_tokens, bool) and isinstance(router.differentiable, bool)
    torch.manual_seed(0)
    out = router(x.reshape(T, D), batch_context(x, ids, attn))
    plan = out.plan
    plan.validate()
    assert isinstance(plan, SparsePlan if router.plan_kind == "sparse" else DensePlan)
    assert plan.num_tokens == T
    if out.probs_TE is not None:
        assert out.probs_TE.shape == (T, E) and bool(torch.isfinite(out.probs_TE).all())
    R = T if out.inputs_RD is None else out.inputs_RD.shape[0]
    if out.inputs_RD is not None:
        assert out.inputs_RD.shape == (R, D)
    if isinstance(plan, SparsePlan) and plan.num_rows:
        assert 0 <= int(plan.gather_idx_N.min()) and int(plan.gather_idx_N.max()) < R


@pytest.mark.parametrize("name", ROUTERS)
def test_eval_is_deterministic(name):
    layer = make_layer(name).eval()
    x, ids, attn = make_inputs()
    y1, aux1 = run(layer, x, ids, attn, seed=1)
    y2, aux2 = run(layer, x, ids, attn, seed=2)  # a different global seed must not matter in eval
    assert torch.equal(y1, y2)
    if isinstance(aux1.plan, SparsePlan):
        assert torch.equal(aux1.plan.token_idx_N, aux2.plan.token_idx_N)
        assert torch.equal(aux1.plan.expert_idx_N, aux2.plan.expert_idx_N)
        assert torch.equal(aux1.plan.weight_N, aux2.plan.weight_N)
    else:
        assert torch.equal(aux1.plan.dispatch_GSEC, aux2.plan.dispatch_GSEC)


@pytest.mark.parametrize("name", ROUTERS)
def test_task_loss_reaches_router_parameters(name):
    layer = make_layer(name).train()
    x, ids, attn = make_inputs()
    y, aux = run(layer, x, ids, attn)
    (y * torch.randn_like(y)).sum().add(aux.loss).backward()
    params = [(n, p) for n, p in layer.router.named_parameters() if p.requires_grad]
    if layer.router.differentiable:
        assert params, f"router {name!r} claims to be differentiable but has no trainable parameter"
        for n, p in params:
            assert p.grad is not None, f"no gradient for router parameter {n}"
            assert bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().sum()) > 0, f"zero gradient for {n}"
    else:
        for n, p in params:
            assert p.grad is None or float(p.grad.abs().sum()) == 0, f"non-differentiable router got a grad in {n}"
    for n, p in layer.experts.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), n


def _output_and_grads(layer, x, ids, attn, gy, training):
    layer.train(training)
    x = x.detach().clone().requires_grad_(True)
    y, aux = run(layer, x, ids, attn)
    names, params = zip(*layer.named_parameters())
    grads = torch.autograd.grad((y * gy).sum() + aux.loss, [x, *params], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [x, *params])]
    return y.detach(), dict(zip(["input", *names], grads))


def assert_same_outputs_and_grads(fast, ref, training):
    """``fast`` and ``ref`` (same weights) agree on the output and every gradient, float64 tolerances."""
    x, ids, attn = make_inputs()
    gy = torch.randn_like(x)
    y_ref, g_ref = _output_and_grads(ref, x, ids, attn, gy, training)
    y_fast, g_fast = _output_and_grads(fast, x, ids, attn, gy, training)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-10, rtol=1e-8)
    assert g_fast.keys() == g_ref.keys()
    for key in g_ref:
        torch.testing.assert_close(g_fast[key], g_ref[key], atol=1e-10, rtol=1e-8, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("group_mode", ["batch", "position"])
@pytest.mark.parametrize("backend", ["loop", "fast", "unfused"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ROUTERS)
def test_fast_engine_equals_reference(name, training, backend, group_mode):
    ref = make_layer(name, backend="reference", group_mode=group_mode)
    fast = make_layer(name, backend=backend, group_mode=group_mode)
    fast.load_state_dict(ref.state_dict())
    assert_same_outputs_and_grads(fast, ref, training)


@pytest.mark.parametrize("backend", ["fast", "unfused"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("experts", [label for label, _ in EXPERT_VARIANTS])
@pytest.mark.parametrize("name", ROUTERS)
def test_every_expert_type_on_both_engine_paths_equals_reference(name, experts, training, backend):
    make_kwargs = dict(EXPERT_VARIANTS)[experts]
    ref = make_layer(name, backend="reference", **make_kwargs())
    with torch.no_grad():  # non-zero biases, so that a bias applied to the wrong rows would show
        for n, p in ref.experts.named_parameters():
            if n.startswith("b") and n.endswith(("_EF", "_ED")):
                p.normal_()
    fast = make_layer(name, backend=backend, **make_kwargs())
    fast.load_state_dict(ref.state_dict())
    assert_same_outputs_and_grads(fast, ref, training)


@pytest.mark.parametrize("name", ROUTERS)
def test_router_declarations(name):
    """What models read of a router is declared on it, with the right types (never a name or hasattr)."""
    router = make_layer(name).router
    assert router.registry_name == name and router.name == name
    for flag in ("couples_tokens", "differentiable", "needs_token_ids", "needs_attention_probs"):
        assert isinstance(getattr(router, flag), bool), flag
    assert router.plan_kind in ("sparse", "dense")
    assert router.capacity_options <= {"capacity_factor", "batch_priority"}
    k = router.experts_per_token(L)
    assert isinstance(k, float) and 0 < k <= E, k
    assert router.extra_flops_per_token() >= 0
    cf, bp = router.get_capacity()
    if "capacity_factor" in router.capacity_options:
        router.set_capacity(1.5)
        assert router.get_capacity()[0] == 1.5
        router.set_capacity(cf, bp)
        with pytest.raises(ValueError, match="capacity_factor"):
            router.set_capacity(float("nan"))
    else:
        assert cf is None
        with pytest.raises(ValueError, match=f"router {name!r} has no capacity_factor"):
            router.set_capacity(1.5)
