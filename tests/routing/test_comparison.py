"""The comparison-trained router (Tesauro's comparison paradigm applied to expert selection)."""

import math

import pytest
import torch

import smoe
from smoe.routing.comparison import comparison_gradient

D, E = 8, 2
SIG1 = 1 / (1 + math.exp(-1))  # sigmoid(1) = 0.731059


def injected(g, s, **kw):
    """Gradients of the weights and scores after backpropagating ``g`` into the comparison op's output."""
    w = torch.tensor([[0.6, 0.0]], requires_grad=True)
    s = torch.tensor([s], requires_grad=True)
    out = comparison_gradient(w, s, **kw)
    assert torch.equal(out, w.detach())  # identity in the forward pass
    (out * torch.tensor([g])).sum().backward()
    return w.grad, s.grad


def test_injected_gradient_hand_worked():
    # s_i - s_j = 1, tau = 1; g_i = -1 < g_j = +1: expert i lowers the loss more, label y = 1
    # d BCE / d (s_i - s_j) = sigmoid(1) - 1 = -0.268941 (pushes s_i up and s_j down), mean over T = 1 token
    w_grad, s_grad = injected([-1.0, 1.0], [1.0, 0.0])
    torch.testing.assert_close(w_grad, torch.tensor([[-1.0, 1.0]]))  # the task gradient passes through
    torch.testing.assert_close(s_grad, torch.tensor([[SIG1 - 1, 1 - SIG1]]))
    # the opposite preference: y = 0, gradient sigmoid(1) - 0
    _, s_grad = injected([1.0, -1.0], [1.0, 0.0])
    torch.testing.assert_close(s_grad, torch.tensor([[SIG1, -SIG1]]))
    # tau = 2 and strength 3: d = 0.5, gradient 3 * (sigmoid(0.5) - 1) / 2
    _, s_grad = injected([-1.0, 1.0], [1.0, 0.0], temperature=2.0, strength=3.0)
    c = 3 * (1 / (1 + math.exp(-0.5)) - 1) / 2
    torch.testing.assert_close(s_grad, torch.tensor([[c, -c]]))
    # soft label sigmoid((g_j - g_i) / 1) = sigmoid(2) = 0.880797: gradient sigmoid(1) - 0.880797
    _, s_grad = injected([-1.0, 1.0], [1.0, 0.0], label_temperature=1.0)
    c = SIG1 - 1 / (1 + math.exp(-2))
    torch.testing.assert_close(s_grad, torch.tensor([[c, -c]]))
    # a tie carries no preference: no comparison gradient
    _, s_grad = injected([0.5, 0.5], [1.0, 0.0])
    torch.testing.assert_close(s_grad, torch.zeros(1, 2))


def test_probe_rows_do_not_change_the_output():
    tc = smoe.MoE(D, 16, 4, 1, router_kwargs={"balance_loss_weight": 0.0}, dtype=torch.float64)
    cmp = smoe.MoE(D, 16, 4, 1, router="comparison", dtype=torch.float64)
    cmp.load_state_dict(tc.state_dict())
    x = torch.randn(2, 5, D, dtype=torch.float64)
    y_cmp, aux = cmp.train()(x)
    plan = aux.plan
    assert plan.num_rows == 2 * 10  # K = 1: one active row and one probe row per token
    probes = plan.weight_N == 0
    assert int(probes.sum()) == 10
    # the probe is the runner-up expert of each token
    logits = x.reshape(10, D).float() @ cmp.router.gate.weight.float().t()
    runner_up = logits.topk(2, dim=-1).indices[:, 1]
    assert torch.equal(plan.expert_idx_N[probes], runner_up[plan.token_idx_N[probes]])
    torch.testing.assert_close(y_cmp, tc(x)[0])
    _, aux = cmp.eval()(x)
    assert aux.plan.num_rows == 10  # no probes at inference


def test_random_partner_is_another_expert():
    layer = smoe.MoE(D, 16, 6, 2, router="comparison", router_kwargs={"pair": "random"})
    x = torch.randn(400, D)
    _, aux = layer(x)
    plan = aux.plan
    assert plan.num_rows == 400 * 3  # two active experts and one probe per token
    top1 = (x @ layer.router.gate.weight.t()).argmax(-1)
    probe_t, probe_e = plan.token_idx_N[plan.weight_N == 0], plan.expert_idx_N[plan.weight_N == 0]
    assert bool((probe_e != top1[probe_t]).all())
    assert set(probe_e.tolist()) == set(range(6))  # explores every expert


def test_without_comparison_and_task_gradient_the_gate_learns_nothing():
    layer = smoe.MoE(D, 16, E, 1, router="comparison", router_kwargs={"comparison_weight": 0.0, "task_gradient": False})
    y, aux = layer(torch.randn(10, D))
    y.sum().backward()
    assert layer.router.gate.weight.grad is None or float(layer.router.gate.weight.grad.abs().sum()) == 0


def train_router(top_k: int, **router_kwargs) -> tuple[float, float]:
    """Two token classes; expert c is exactly the target for class c; the gate starts preferring the wrong expert.

    Only the router trains (experts frozen), on ``|| y - f_class(x) ||^2``. Returns the fraction of fresh tokens
    whose top-1 expert is their class's expert, before and after training.
    """
    torch.manual_seed(0)
    layer = smoe.MoE(D, 16, E, top_k, router="comparison", router_kwargs={"balance_loss_weight": 0.0, **router_kwargs})
    layer.experts.requires_grad_(False)
    mu = torch.randn(2, D)
    mu = 2 * mu / mu.norm(dim=1, keepdim=True)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.stack([mu[1], mu[0]]))  # class 0 -> expert 1 and vice versa

    def batch(n):
        c = torch.randint(0, 2, (n,))
        x = mu[c] + 0.3 * torch.randn(n, D)
        with torch.no_grad():
            f_NED = torch.stack([layer.experts.expert_forward(e, x) for e in range(E)], dim=1)
        return x, c, f_NED[torch.arange(n), c]

    def accuracy():
        x, c, _ = batch(500)
        return float((layer.router.logits(x).argmax(-1) == c).float().mean())

    before = accuracy()
    opt = torch.optim.SGD(layer.router.parameters(), lr=0.5)
    for _ in range(40):
        x, _, target = batch(64)
        y, _ = layer(x)
        opt.zero_grad()
        (y - target).pow(2).sum(-1).mean().backward()
        opt.step()
    return before, accuracy()


@pytest.mark.parametrize("top_k,pair", [(1, "runner_up"), (2, "runner_up"), (1, "random")])
def test_comparisons_alone_learn_which_expert_is_better(top_k, pair):
    before, after = train_router(top_k, pair=pair, task_gradient=False)
    assert before < 0.05  # the gate starts with the wrong preference for both classes
    assert after > 0.95


def test_task_gradient_alone_learns_less_on_the_same_problem():
    # the contrast the comparison paradigm is for: backprop tells the router about the selected expert only
    _, after_task = train_router(1, comparison_weight=0.0)
    _, after_cmp = train_router(1, task_gradient=False)
    assert after_cmp > after_task + 0.3


@pytest.mark.parametrize(
    "kwargs,match",
    [({"pair": "best"}, "pair"), ({"temperature": 0.0}, "temperature"), ({"label_temperature": -1.0}, "temperature")],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        smoe.MoE(D, 16, E, 1, router="comparison", router_kwargs=kwargs)
    with pytest.raises(ValueError, match="at least 2 experts"):
        smoe.MoE(D, 16, 1, 1, router="comparison")
