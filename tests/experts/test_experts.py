"""The expert types: registry, layouts, what each computes, autocast, and accounting.

The seam path of every expert type is checked against the reference engine on outputs and every gradient in
``tests/routing/test_contract.py`` (every router x every expert type x both engine paths); here the pieces.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import smoe
from smoe.experts import ACTIVATIONS, GELUExperts, ModuleExperts, ReLUExperts, SwiGLUExperts, get_activation

F64 = torch.float64


def test_registry_lists_and_refuses():
    assert smoe.list_experts() == ["clamped_swiglu", "gelu", "relu", "swiglu"]
    assert smoe.get_experts("relu") is ReLUExperts
    with pytest.raises(ValueError, match="expected one of \\['clamped_swiglu', 'gelu', 'relu', 'swiglu'\\]"):
        smoe.get_experts("tanh")
    with pytest.raises(ValueError, match="expert type 'gelu'.*colour"):
        smoe.build_experts("gelu", dim=4, hidden_dim=8, num_experts=2, colour="blue")
    with pytest.raises(ValueError, match="already registered"):
        smoe.register_experts("gelu")(ReLUExperts)


@pytest.mark.parametrize(
    ("cls", "bias", "names"),
    [
        (SwiGLUExperts, False, ["w1_EFD", "w3_EFD", "w2_EDF"]),
        (SwiGLUExperts, True, ["w1_EFD", "w3_EFD", "w2_EDF", "b1_EF", "b3_EF", "b2_ED"]),
        (GELUExperts, False, ["w1_EFD", "w2_EDF"]),
        (ReLUExperts, True, ["w1_EFD", "w2_EDF", "b1_EF", "b2_ED"]),
    ],
)
def test_parameter_layout_is_the_checkpoint_format(cls, bias, names):
    ex = cls(6, 10, 3, bias=bias)
    shapes = {"w1_EFD": (3, 10, 6), "w3_EFD": (3, 10, 6), "w2_EDF": (3, 6, 10), "b1_EF": (3, 10), "b3_EF": (3, 10)}
    shapes["b2_ED"] = (3, 6)
    assert [n for n, _ in ex.named_parameters()] == names
    for n, p in ex.named_parameters():
        assert tuple(p.shape) == shapes[n], n
    assert ex.can_fuse == (cls is SwiGLUExperts and not bias)


@pytest.mark.parametrize("cls", [SwiGLUExperts, GELUExperts, ReLUExperts])
def test_expert_forward_is_the_formula(cls):
    ex = cls(6, 10, 3, bias=True, dtype=F64)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_()
    x = torch.randn(5, 6, dtype=F64)
    e = 1
    h1 = x @ ex.w1_EFD[e].t() + ex.b1_EF[e]
    if cls is SwiGLUExperts:  # Shazeer 2020: w2 (silu(w1 x) * w3 x)
        hidden = F.silu(h1) * (x @ ex.w3_EFD[e].t() + ex.b3_EF[e])
    else:
        hidden = F.gelu(h1) if cls is GELUExperts else torch.relu(h1)
    torch.testing.assert_close(ex.expert_forward(e, x), hidden @ ex.w2_EDF[e].t() + ex.b2_ED[e])


def test_forward_runs_each_expert_on_its_segment():
    ex = GELUExperts(6, 10, 3, bias=True, dtype=F64)
    x = torch.randn(7, 6, dtype=F64)
    counts = torch.tensor([2, 0, 5])
    want = torch.cat([ex.expert_forward(0, x[:2]), ex.expert_forward(2, x[2:])])
    torch.testing.assert_close(ex(x, counts), want)
    torch.testing.assert_close(ex(x[:0], torch.zeros(3, dtype=torch.long)), torch.zeros(0, 6, dtype=F64))


def test_activation_table():
    assert sorted(ACTIVATIONS) == ["clamped_swiglu", "gelu", "relu", "swiglu"]
    assert get_activation("swiglu").gated and not get_activation("gelu").gated
    h1, h3 = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(get_activation("swiglu")(h1, h3), F.silu(h1) * h3)
    with pytest.raises(ValueError, match="swish"):
        get_activation("swish")


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="hidden_dim"):
        SwiGLUExperts(4, 0, 2)
    with pytest.raises(ValueError, match="num_experts"):
        GELUExperts(4, 8, True)
    with pytest.raises(ValueError, match="bias"):
        GELUExperts(4, 8, 2, bias=1)
    with pytest.raises(ValueError, match="at least one"):
        ModuleExperts([])
    with pytest.raises(ValueError, match="expert 1 must be an nn.Module"):
        ModuleExperts([nn.Linear(2, 2), "not a module"])


def test_module_experts_layout_and_flops():
    ex = ModuleExperts([nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)) for _ in range(3)], dim=4)
    assert len(ex) == 3 and ex[1] is list(ex)[1]
    assert "1.2.weight" in dict(ex.named_parameters())  # expert e's module under the prefix "e."
    assert ex.flops_per_row() == 2 * (4 * 8 + 8 * 4)
    convs = ModuleExperts([nn.Conv2d(1, 1, 3) for _ in range(2)])
    with pytest.raises(ValueError, match="Conv2d"):
        convs.flops_per_row()
    assert SwiGLUExperts(4, 8, 2).flops_per_row() == 2 * 3 * 4 * 8


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_autocast_casts_the_weights_for_any_input_dtype(input_dtype):
    """Under bf16 autocast a float32 layer accepts float32 and bfloat16 inputs alike (as nn.Linear does)."""
    layer = smoe.MoE(16, 32, 4, 2)
    with torch.no_grad():
        layer.router.gate.weight.mul_(20)  # decisive routing: bf16 rounding cannot flip a choice
    x = torch.randn(12, 16)
    with torch.no_grad():
        want, _ = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, _ = layer(x.to(input_dtype))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("kind", ["swiglu", "gelu_bias", "module"])
def test_shard_keeps_a_range_of_experts_with_their_weights(kind):
    torch.manual_seed(0)
    if kind == "module":
        full = smoe.ModuleExperts([torch.nn.Linear(6, 6) for _ in range(4)], dim=6)
    else:
        full = smoe.build_experts(kind.split("_")[0], dim=6, hidden_dim=10, num_experts=4, bias=kind.endswith("bias"))
    part = full.shard(2, 2)
    assert type(part) is type(full) and part.num_experts == 2
    x = torch.randn(5, 6)
    for e in range(2):
        torch.testing.assert_close(part.expert_forward(e, x), full.expert_forward(2 + e, x), rtol=0, atol=0)
    with torch.no_grad():  # copies, not views: training the shard leaves the full layer alone
        next(part.parameters()).add_(1.0)
    torch.testing.assert_close(part.expert_forward(1, x), part.expert_forward(1, x))
    assert not torch.equal(part.expert_forward(0, x), full.expert_forward(2, x))
    for first, count in [(3, 2), (-1, 1), (0, 0)]:
        with pytest.raises(ValueError, match="not a range"):
            full.shard(first, count)
