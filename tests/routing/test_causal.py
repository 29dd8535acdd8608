"""Causal safety of every registered router, and the layer's refusal of leaking configurations.

A router is *causal-safe* in a configuration when the MoE output at position ``t`` does not change when the tokens
after ``t`` change (in every sequence of the batch). For each router we pick its causal-safe configuration:

* a router that does not couple tokens runs in the default ``group_mode="batch"``;
* a coupling router with a causal option (``CAUSAL_KWARGS``) runs with it, in ``group_mode="batch"``;
* any other coupling router runs in ``group_mode="position"`` (groups hold one token per sequence);
* a router listed in ``NEVER_CAUSAL`` must be refused by ``MoE(..., causal=True)`` in every group mode.

Then we check the property itself, in training (same seed for both runs) and evaluation mode, with the token ids
and a causal attention matrix recomputed from the modified input. ``MoE(..., causal=True)`` must refuse every
coupling configuration outside ``group_mode="position"`` unless ``allow_token_coupling=True``.
"""

import pytest
import torch

import smoe

F64 = torch.float64
B, L, D, F, E, K = 2, 6, 8, 16, 4, 2
VOCAB = 50

#: router options that make a coupling router causal-safe in any group mode
CAUSAL_KWARGS: dict[str, dict] = {"similarity": {"causal": True}}
#: routers that leak even with one token per sequence in a group: the causal layer must refuse them outright
NEVER_CAUSAL: set[str] = set()

#: coupling configurations set by explicit options (id, router name, MoE kwargs); their causal-safe configuration
#: is group_mode="position"
COUPLING_VARIANTS = [
    ("token_choice_capacity", "token_choice", {"capacity_factor": 1.0}),
    ("token_choice_bpr", "token_choice", {"capacity_factor": 0.75, "router_kwargs": {"batch_priority": True}}),
    ("similarity_unmasked", "similarity", {"router_kwargs": {"causal": False}}),
    ("attention_aware_capacity", "attention_aware", {"capacity_factor": 1.0}),
    ("s2moe_group_noise", "s2moe", {"router_kwargs": {"noise_stats": "group"}}),
]


def make_layer(name, **kw):
    return smoe.MoE(D, F, E, K, router=name, dtype=F64, **kw)


def causal_attention(x_BLD: torch.Tensor) -> torch.Tensor:
    """``(B, 2, L, L)`` causal softmax attention computed from ``x``: row ``t`` depends on ``x[:, :t+1]`` only."""
    scores_BLL = x_BLD @ x_BLD.transpose(1, 2) / D**0.5
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    scores_BHLL = torch.stack([scores_BLL, 2 * scores_BLL], dim=1)
    return scores_BHLL.masked_fill(future, float("-inf")).softmax(dim=-1)


def future_changed_inputs(t: int):
    """Two inputs (x, token ids, causal attention) that agree up to position ``t`` and differ after it."""
    x1 = torch.randn(B, L, D, dtype=F64)
    ids1 = torch.randint(0, VOCAB, (B, L))
    x2, ids2 = x1.clone(), ids1.clone()
    x2[:, t + 1 :] = torch.randn(B, L - t - 1, D, dtype=F64)
    ids2[:, t + 1 :] = torch.randint(0, VOCAB, (B, L - t - 1))
    return (x1, ids1, causal_attention(x1)), (x2, ids2, causal_attention(x2))


def prefix_unchanged(layer, t: int, training: bool) -> bool:
    layer.train(training)
    outputs = []
    for x, ids, attn in future_changed_inputs(t):
        torch.manual_seed(0)  # same randomness in both runs (noise, random routing, random partners)
        y, _ = layer(x, token_ids=ids, attn_probs=attn)
        outputs.append(y[:, : t + 1])
    return torch.allclose(outputs[0], outputs[1], atol=1e-12, rtol=0)


def _all_cases():
    cases = [pytest.param(name, {}, id=name) for name in smoe.list_routers()]
    return cases + [pytest.param(name, kw, id=case_id) for case_id, name, kw in COUPLING_VARIANTS]


def safe_config(name, kw):
    """MoE kwargs of the causal-safe configuration of router ``name`` with options ``kw`` (module docstring)."""
    if not make_layer(name, **kw).router.couples_tokens:
        return kw
    if name in CAUSAL_KWARGS and not kw:  # a variant with explicit options keeps them and goes to position mode
        safe = {"router_kwargs": CAUSAL_KWARGS[name]}
        # the causal option must remove the coupling itself, not rely on the group mode
        assert not make_layer(name, **safe).router.couples_tokens
        return safe
    return {**kw, "group_mode": "position"}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,kw", _all_cases())
def test_output_before_t_ignores_tokens_after_t(name, kw, training):
    if name in NEVER_CAUSAL:
        for mode in ("batch", "sequence", "position"):
            with pytest.raises(ValueError):
                make_layer(name, causal=True, group_mode=mode, **kw)
        return
    safe = safe_config(name, kw)
    layer = make_layer(name, causal=True, **safe)  # the causal layer accepts the causal-safe configuration
    for t in (0, 2, L - 2):
        assert prefix_unchanged(layer, t, training), f"{name} {safe}: output at t={t} depends on later tokens"


@pytest.mark.parametrize("name,kw", _all_cases())
def test_causal_layer_refuses_leaking_configurations(name, kw):
    router = make_layer(name, **kw).router
    if not router.couples_tokens:
        make_layer(name, causal=True, group_mode="sequence", **kw)  # nothing to refuse
        return
    for mode in ("batch", "sequence"):
        with pytest.raises(ValueError, match="allow_token_coupling"):
            make_layer(name, causal=True, group_mode=mode, **kw)
        make_layer(name, causal=True, group_mode=mode, allow_token_coupling=True, **kw)  # explicit opt-in
    with pytest.raises(ValueError, match="allow_token_coupling"):
        make_layer(name, causal=True, group_size=B * L, **kw)


@pytest.mark.parametrize(
    "name,kw", [("usmoe", {}), ("expert_choice", {}), ("similarity", {"router_kwargs": {"causal": False}})]
)
def test_the_check_detects_a_real_leak(name, kw):
    # the property test has teeth: coupling routers in group_mode="batch" do leak on these inputs
    layer = make_layer(name, allow_token_coupling=True, **kw)
    with torch.no_grad():
        for p in layer.router.parameters():
            p.mul_(30)  # decisive scores, so that a changed competitor flips a selection
    assert not all(prefix_unchanged(layer, t, training=False) for t in (0, 1, 2, 3))


def test_causal_kwargs_name_registered_routers():
    # keep the tables honest when routers are renamed
    registered = set(smoe.list_routers())
    assert set(CAUSAL_KWARGS) <= registered and NEVER_CAUSAL <= registered
    assert {name for _, name, _ in COUPLING_VARIANTS} <= registered
