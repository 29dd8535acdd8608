"""Bad input gets a ValueError that names the offending value."""

import pytest
import torch

import smoe


@pytest.fixture
def layer():
    return smoe.MoE(8, 16, 4, 2)


@pytest.mark.parametrize(
    "shape,match", [((2, 3, 4, 8), "4-d"), ((8,), "1-d"), ((5, 7), "width 7"), ((0, 8), "empty"), ((2, 0, 8), "empty")]
)
def test_bad_input_shapes(layer, shape, match):
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(shape))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input(layer, value):
    x = torch.randn(4, 8)
    x[2, 3] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(x)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(top_k=5), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(router="no_such_router"), "token_choice"),  # the error lists the valid names
        (dict(expert="tanh"), "tanh"),  # an unknown expert type: the error lists the valid ones
        (dict(experts="tanh"), "swiglu"),
        (dict(group_mode="document"), "document"),
        (dict(group_size=0), "group_size"),
        (dict(router_kwargs={"order": "sideways"}), "sideways"),
        (dict(router_kwargs={"score_fn": "tanh"}), "tanh"),
        (dict(router_kwargs={"noise": "pink"}), "pink"),
        (dict(router_kwargs={"no_such_option": 1}), "no_such_option"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = dict(dim=8, hidden_dim=16, num_experts=4, top_k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        smoe.MoE(**args)


@pytest.mark.parametrize("name", ["dim", "hidden_dim", "num_experts"])
def test_bad_sizes(name):
    args = dict(dim=8, hidden_dim=16, num_experts=4, top_k=1)
    args[name] = 0
    with pytest.raises(ValueError, match=name):
        smoe.MoE(**args)


def test_group_size_must_divide_tokens():
    layer = smoe.MoE(8, 16, 4, 1, capacity_factor=1.0, group_size=4)
    with pytest.raises(ValueError, match="group_size=4"):
        layer(torch.randn(6, 8))


def test_token_ids_shape_checked(layer):
    with pytest.raises(ValueError, match="token_ids"):
        layer(torch.randn(2, 3, 8), token_ids=torch.zeros(2, 4, dtype=torch.long))


def test_unknown_router_lists_valid_names():
    with pytest.raises(ValueError) as info:
        smoe.get_router("nope")
    for name in ("token_choice", "expert_choice", "force_balanced"):
        assert name in str(info.value)
