"""Hash routing (a fixed function of the token id) and random routing (balanced in expectation)."""

import pytest
import torch

import smoe
from smoe.routing.hash import HashRouter, balanced_hash_table, hash_experts

D, E, K = 8, 8, 2


def experts_by_token(plan, T):
    """``{token: frozenset of experts}`` from a sparse plan."""
    out = {t: set() for t in range(T)}
    for t, e in zip(plan.token_idx_N.tolist(), plan.expert_idx_N.tolist()):
        out[t].add(e)
    return {t: frozenset(s) for t, s in out.items()}


@pytest.mark.parametrize("group_mode", ["batch", "position"])
def test_hash_is_a_fixed_function_of_the_token_id(group_mode):
    layer = smoe.MoE(D, 16, E, K, router="hash", group_mode=group_mode)
    seen: dict[int, frozenset] = {}
    for B, L in [(2, 7), (3, 4), (1, 9)]:  # different positions, batches, shapes and calls
        ids = torch.randint(0, 20, (B, L))
        x = torch.randn(B, L, D)  # the hidden state must not matter
        _, aux = layer(x, token_ids=ids)
        routed_ids = ids.transpose(0, 1).reshape(-1) if group_mode == "position" else ids.reshape(-1)
        for t, experts in experts_by_token(aux.plan, B * L).items():
            assert len(experts) == K  # K distinct experts
            seen.setdefault(int(routed_ids[t]), experts)
            assert seen[int(routed_ids[t])] == experts
    assert len(set(seen.values())) > 1  # not a constant map


def test_hash_weights_and_no_parameters():
    layer = smoe.MoE(D, 16, E, K, router="hash")
    _, aux = layer(torch.randn(5, D), token_ids=torch.arange(5))
    torch.testing.assert_close(aux.plan.weight_N, torch.full((10,), 0.5))
    assert list(layer.router.parameters()) == [] and not layer.router.differentiable


def test_hash_spreads_ids_evenly():
    router = HashRouter(dim=D, num_experts=E, top_k=1)
    counts = torch.bincount(
        hash_experts(torch.arange(16000), router.hash_a_E, router.hash_b_E, 1).view(-1), minlength=E
    )
    assert int(counts.min()) > 0.9 * 2000 and int(counts.max()) < 1.1 * 2000


def test_hash_depends_on_the_seed_and_survives_a_checkpoint():
    ids = torch.arange(100)
    a = HashRouter(dim=D, num_experts=E, top_k=K, seed=0)
    b = HashRouter(dim=D, num_experts=E, top_k=K, seed=1)
    assert not torch.equal(a.experts_for(ids), b.experts_for(ids))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.experts_for(ids), b.experts_for(ids))


def test_balanced_table_hand_worked_and_lookup():
    # counts [10, 1, 5, 5], E = 2, most frequent first to the least-loaded expert (ties: lowest index):
    # id 0 (10) -> e0 (loads 10, 0); id 2 (5) -> e1 (10, 5); id 3 (5) -> e1 (10, 10); id 1 (1) -> e0 (11, 10)
    table = balanced_hash_table(torch.tensor([10, 1, 5, 5]), 2)
    assert table.view(-1).tolist() == [0, 0, 1, 1]
    router = HashRouter(dim=D, num_experts=2, top_k=1)
    router.set_table(table)
    assert router.experts_for(torch.tensor([3, 0, 2, 1])).view(-1).tolist() == [1, 0, 1, 0]
    fresh = HashRouter(dim=D, num_experts=2, top_k=1)
    fresh.load_state_dict(router.state_dict())  # the table is part of the checkpoint
    assert torch.equal(fresh.table_VK, table)
    with pytest.raises(ValueError, match="outside the hash table"):
        router.experts_for(torch.tensor([4]))
    with pytest.raises(ValueError, match="expert indices"):
        router.set_table(torch.tensor([[2]]))


def test_hash_needs_token_ids():
    layer = smoe.MoE(D, 16, E, K, router="hash")
    with pytest.raises(ValueError, match="token_ids"):
        layer(torch.randn(4, D))
    with pytest.raises(ValueError, match="non-negative"):
        layer(torch.randn(4, D), token_ids=torch.tensor([0, 1, -2, 3]))
    with pytest.raises(ValueError, match="capacity_factor"):
        smoe.MoE(D, 16, E, K, router="hash", capacity_factor=1.0)


def test_random_routing_is_balanced_in_expectation():
    layer = smoe.MoE(D, 16, E, K, router="random")
    T = 8000
    _, aux = layer(torch.randn(T, D))
    counts = aux.stats["tokens_per_expert"]
    expected = T * K / E  # 2000 per expert; the std of a count is about sqrt(2000 * 7/8) = 42
    assert int(counts.min()) > 0.9 * expected and int(counts.max()) < 1.1 * expected
    per_token = experts_by_token(aux.plan, T)
    assert all(len(s) == K for s in per_token.values())  # K distinct experts per token
    torch.testing.assert_close(aux.plan.weight_N, torch.full((T * K,), 1.0 / K))


def test_random_routing_is_fixed_in_eval_and_fresh_in_training():
    layer = smoe.MoE(D, 16, E, K, router="random")
    x = torch.randn(50, D)
    layer.eval()
    torch.manual_seed(1)
    e1 = layer(x)[1].plan.expert_idx_N
    torch.manual_seed(2)
    e2 = layer(torch.randn(50, D))[1].plan.expert_idx_N  # nor the input matter
    assert torch.equal(e1, e2)
    layer.train()
    t1 = layer(x)[1].plan
    t2 = layer(x)[1].plan
    assert experts_by_token(t1, 50) != experts_by_token(t2, 50)
    other_seed = smoe.MoE(D, 16, E, K, router="random", router_kwargs={"seed": 7}).eval()
    assert experts_by_token(other_seed(x)[1].plan, 50) != experts_by_token(layer.eval()(x)[1].plan, 50)
