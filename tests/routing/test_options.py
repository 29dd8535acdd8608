"""Issue 14, item 9: every router option is validated where it is given.

Every constructor keyword of every registered router has a declared spec (``OPTIONS``, :mod:`smoe.routing.options`);
a property-based test (hypothesis) then draws, for every router and option, values outside the spec, which must be
refused at construction with a ``ValueError`` naming the option, and values inside it, which must build a layer
that runs to a finite output and finite losses, or be refused naming the option (options that depend on others,
such as ``batch_priority`` without a capacity factor).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import smoe
from smoe.routing.options import OptionSpec, router_options
from smoe.routing.registry import router_parameters

ROUTERS = smoe.list_routers()
D, F, E, K, B, L = 8, 12, 4, 2, 2, 6
NOT_OPTIONS = {"dim", "num_experts", "top_k", "device", "dtype"}  # the layer's own, checked by the MoE


@pytest.mark.parametrize("name", ROUTERS)
def test_every_constructor_option_has_a_spec(name):
    cls = smoe.get_router(name)
    missing = router_parameters(cls) - set(router_options(cls)) - {"device", "dtype"}
    assert not missing, f"{name}: options without a spec in OPTIONS: {sorted(missing)}"


def invalid_values(spec: OptionSpec) -> st.SearchStrategy:
    bad: list = ["not a value", object()]
    if not spec.none:
        bad.append(None)
    if spec.kind in ("real", "int"):
        bad += [True, False, math.nan, math.inf, -math.inf]
        if spec.lo is not None:
            bad += [spec.lo - 1, spec.lo - 1e-3] + ([spec.lo] if spec.lo_open else [])
        if spec.hi is not None:
            bad += [spec.hi + 1] + ([spec.hi] if spec.hi_open else [])
        if spec.kind == "int":
            bad += [1.5, 2.0]
    elif spec.kind == "flag":
        bad += [1, 0, "yes"]
    elif spec.kind == "choice":
        bad += ["bogus", 1]
    elif spec.kind == "int_tuple":
        bad += [(0,), (-2,), (1.5,), ("a",), 3]
    return st.sampled_from([v for v in bad if not spec.accepts(v)])


def valid_values(spec: OptionSpec) -> st.SearchStrategy:
    options = [st.none()] if spec.none else []
    if spec.kind == "flag":
        options.append(st.booleans())
    elif spec.kind == "choice":
        options.append(st.sampled_from(spec.choices))
    elif spec.kind == "int_tuple":
        options.append(st.lists(st.integers(1, 6), max_size=2).map(tuple))
    elif spec.kind == "int":
        lo = int(spec.lo) if spec.lo is not None else -3
        hi = int(spec.hi) if spec.hi is not None else lo + 8  # small: an iteration count, a slot count
        options.append(st.integers(lo, hi))
    else:
        lo = spec.lo if spec.lo is not None else -5.0
        hi = spec.hi if spec.hi is not None else lo + 5.0
        options.append(
            st.floats(lo, hi, exclude_min=spec.lo_open, exclude_max=spec.hi_open, allow_nan=False, allow_infinity=False)
        )
    return st.one_of(options)


def _options(name: str) -> list[str]:
    return sorted(set(router_options(smoe.get_router(name))) - NOT_OPTIONS)


CASES = [(name, option) for name in ROUTERS for option in _options(name)]


def _given(option: str, value) -> dict:
    """How an option reaches the layer: the capacity factor is the layer's own argument, the rest router_kwargs."""
    return {"capacity_factor": value} if option == "capacity_factor" else {"router_kwargs": {option: value}}


def _run(layer: smoe.MoE) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, D, generator=g, requires_grad=True)
    ids = torch.randint(0, 50, (B, L), generator=g)
    attn = torch.randn(B, L, L, generator=g).softmax(-1)
    y, aux = layer(x, token_ids=ids, attn_probs=attn)
    assert torch.isfinite(y).all() and torch.isfinite(aux.loss)
    (y.sum() + aux.loss).backward()
    assert torch.isfinite(x.grad).all()


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_invalid_option_values_are_refused_at_construction_naming_the_option(data):
    name, option = data.draw(st.sampled_from(CASES), label="router, option")
    spec = router_options(smoe.get_router(name))[option]
    value = data.draw(invalid_values(spec), label=option)
    with pytest.raises(ValueError, match=re.escape(option)):
        smoe.MoE(D, F, E, K, router=name, **_given(option, value))


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_valid_option_values_build_a_layer_that_runs_finitely_or_are_refused_naming_the_option(data):
    name, option = data.draw(st.sampled_from(CASES), label="router, option")
    spec = router_options(smoe.get_router(name))[option]
    value = data.draw(valid_values(spec), label=option)
    try:
        layer = smoe.MoE(D, F, E, K, router=name, **_given(option, value)).train()
    except ValueError as e:  # a constraint between options (batch_priority needs a capacity factor, ...)
        assert option in str(e) or (option == "capacity_factor" and "capacity" in str(e)), str(e)
        return
    _run(layer)
    layer.eval()
    with torch.no_grad():
        y, aux = layer(
            torch.randn(B, L, D), token_ids=torch.zeros(B, L, dtype=torch.long), attn_probs=torch.full((B, L, L), 1 / L)
        )
    assert torch.isfinite(y).all()


def test_an_unknown_option_names_the_router_and_its_options():
    with pytest.raises(ValueError, match=r"router 'token_choice' has no option 'noise_sdt'; its options: .*noise_std"):
        smoe.MoE(D, F, E, K, router_kwargs={"noise_sdt": 1.0})


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_experts": True}, "num_experts"),
        ({"group_size": True}, "group_size"),
        ({"shared_expert_hidden_dim": -4}, "shared_expert_hidden_dim"),
        ({"capacity_factor": math.inf}, "capacity_factor"),
        ({"capacity_factor": math.nan}, "capacity_factor"),
        ({"top_k": 2.0}, "top_k"),
    ],
)
def test_moe_options_are_validated(kwargs, name):
    args = dict(dim=D, hidden_dim=F, num_experts=E, top_k=K) | kwargs
    with pytest.raises(ValueError, match=name):
        smoe.MoE(**args)


def test_non_finite_attention_probabilities_are_refused():
    layer = smoe.MoE(D, F, E, K, router="attention_aware")
    attn = torch.full((B, L, L), 1 / L)
    attn[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="attn_probs must be finite"):
        layer(torch.randn(B, L, D), attn_probs=attn)
