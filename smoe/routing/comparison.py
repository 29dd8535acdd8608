"""A router trained by comparison: Tesauro's comparison paradigm applied to expert selection.

Tesauro, "Connectionist Learning of Expert Preferences by Comparison Training" (NeurIPS 1988; reference §10) trains
a network from pairwise judgements "of these two alternatives, which is better?". Its consistent form scores each
alternative with one shared network ``V`` and compares ``C(a, b) = sigmoid(V(a) - V(b))``, which is antisymmetric,
transitive, and lets one choose among ``n`` alternatives by ``argmax V`` (the "symmetric pair network"; the exact
1988 wiring is unconfirmed beyond the paper's first page, reference §10.1-10.2).

**Our own application to routing** (reference §10.3 is a design sketch; we know of no published token-level router
trained this way): the router's logit ``s_e(x) = w_e . x`` is ``V``; the alternatives are experts. For every token
we compare two candidates ``i`` (its top-1 expert) and ``j`` (its runner-up, or a random other expert with
``pair="random"``). The preference label comes from the task loss, to first order: adding ``delta`` of expert
``e``'s output to the token's output changes the loss by ``delta * <dL/dy_t, f_e(x_t)>``, so expert ``i`` is
preferred when ``<dL/dy_t, f_i(x_t)> < <dL/dy_t, f_j(x_t)>``. Those two inner products are exactly the gradients of
the two assignments' combine weights, which the engine computes anyway (``scatter_add_weighted`` backward), even
for a weight that is 0 in the forward pass. Hence:

1. forward: token-choice top-K on ``s`` (softmax-probability weights, as Switch / V-MoE). If ``j`` is not among the
   active experts (``K = 1``, or ``pair="random"``), add a *probe* row ``(t, j)`` with combine weight 0: the output
   is unchanged, the expert runs on one more row (the cost of the counterfactual).
2. backward, in a custom autograd function around the pair's weights: read ``g_i = dL/dw_i`` and ``g_j = dL/dw_j``,
   set the label ``y = 1[g_i < g_j]`` (or the soft label ``sigmoid((g_j - g_i) / label_temperature)``), and add the
   gradient of ``strength * mean_t BCE(sigmoid((s_i - s_j) / tau), y)`` to the two logits. Tokens whose two
   gradients tie (no signal) contribute nothing. The weights' own task gradient passes through unchanged (turn it
   off with ``task_gradient=False`` to train the gate from comparisons only).

So the comparison loss never appears as a returned loss value: its label exists only during the backward pass, and
it acts as an injected gradient (a "synthetic" loss term), documented here instead. Two consequences: the injected
gradient is *not* multiplied by a loss scale (``torch.amp.GradScaler`` would shrink it by the scale after
unscaling: prefer bf16 autocast, which needs no scaler, or raise ``comparison_weight``), and with gradient
accumulation over ``n`` micro-batches whose losses are divided by ``n`` it is ``n`` times stronger relative to the
task gradient.

Selection at inference is plain top-K of ``s`` (no probes, deterministic). Why it may help: backprop alone tells the
router about the experts it selected; comparisons give evidence about an unselected one (reference §10.3). Known
risks (same section): labels are first-order and noisy, and experts adapt to the tokens they get (keep the balance
loss on).

Shape legend: ``T`` tokens, ``E`` experts, ``K`` top-k, ``P = 2`` the compared pair, ``C`` columns per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.routing.base import RouterOutput, RoutingContext
from smoe.routing.gated import GatedRouter
from smoe.routing.options import MIN_SCALE, choice, flag, real
from smoe.routing.plan import sparse_plan_from_topk
from smoe.routing.registry import register_router

__all__ = ["ComparisonRouter", "comparison_gradient"]


class _ComparisonGrad(torch.autograd.Function):
    """Identity on the pair's weights; backward adds the pairwise comparison-loss gradient to the pair's scores."""

    @staticmethod
    def forward(ctx, weight_TP, score_TP, temperature, strength, label_temperature):
        ctx.save_for_backward(score_TP)
        ctx.temperature, ctx.strength, ctx.label_temperature = temperature, strength, label_temperature
        return weight_TP.clone()

    @staticmethod
    def backward(ctx, grad_TP):
        (score_TP,) = ctx.saved_tensors
        g_i, g_j = grad_TP[:, 0].float(), grad_TP[:, 1].float()
        if ctx.label_temperature is None:
            label_T = (g_i < g_j).float()  # i preferred when it lowers the loss more (first order)
            valid_T = (g_i != g_j).float()  # a tie carries no preference
        else:
            label_T = torch.sigmoid((g_j - g_i) / ctx.label_temperature)
            valid_T = torch.ones_like(label_T)
        d_T = (score_TP[:, 0].float() - score_TP[:, 1].float()) / ctx.temperature
        # d BCE(sigmoid(d), y) / d d = sigmoid(d) - y; chain rule through d = (s_i - s_j) / tau; mean over tokens
        c_T = ctx.strength * valid_T * (torch.sigmoid(d_T) - label_T) / (ctx.temperature * score_TP.shape[0])
        grad_score = torch.stack([c_T, -c_T], dim=1).to(score_TP.dtype)
        return grad_TP, grad_score, None, None, None


def comparison_gradient(
    weight_TP: Tensor,
    score_TP: Tensor,
    temperature: float = 1.0,
    strength: float = 1.0,
    label_temperature: float | None = None,
) -> Tensor:
    """Return ``weight_TP`` unchanged; in backward, inject the comparison-loss gradient into ``score_TP``.

    Args:
        weight_TP: ``(T, 2)`` combine weights of the compared experts ``(i, j)`` (a probe's weight is 0).
        score_TP: ``(T, 2)`` router logits ``(s_i, s_j)`` (Tesauro's shared evaluation ``V``).
        temperature: ``tau`` of the comparator ``sigmoid((s_i - s_j) / tau)``.
        strength: weight of the comparison loss.
        label_temperature: ``None`` for hard labels ``1[g_i < g_j]``, else soft labels
            ``sigmoid((g_j - g_i) / label_temperature)``.
    """
    return _ComparisonGrad.apply(weight_TP, score_TP, temperature, strength, label_temperature)


@register_router("comparison")
class ComparisonRouter(GatedRouter):
    """Token choice whose gate also learns from pairwise expert comparisons (module docstring).

    Args (beyond :class:`~smoe.routing.gated.GatedRouter`):
        pair: ``"runner_up"`` (compare top-1 with the second-ranked expert) or ``"random"`` (with a uniformly
            random other expert: exploration of unselected experts).
        comparison_weight: strength of the comparison loss (``0`` turns it off).
        temperature: comparator temperature ``tau``.
        label_temperature: ``None`` (hard labels) or the soft-label temperature.
        task_gradient: let the task loss also reach the gate through the combine weights (ordinary routing).
        renormalize: renormalise the K active weights.
    """

    OPTIONS = {
        "pair": choice("runner_up", "random"),
        "comparison_weight": real(ge=0),
        "temperature": real(ge=MIN_SCALE),
        "label_temperature": real(ge=MIN_SCALE, none=True),
        "task_gradient": flag(),
        "renormalize": flag(),
    }

    def __init__(
        self,
        *,
        pair: str = "runner_up",
        comparison_weight: float = 1.0,
        temperature: float = 1.0,
        label_temperature: float | None = None,
        task_gradient: bool = True,
        renormalize: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if self.capacity_factor is not None:
            raise ValueError(
                f"comparison routing is dropless; capacity_factor must be None, got {self.capacity_factor!r}"
            )
        if pair not in ("runner_up", "random"):
            raise ValueError(f"pair must be 'runner_up' or 'random', got {pair!r}")
        if self.num_experts < 2:
            raise ValueError(f"comparison routing needs at least 2 experts, got num_experts={self.num_experts}")
        if not temperature > 0 or (label_temperature is not None and not label_temperature > 0):
            raise ValueError(f"temperatures must be > 0, got {temperature!r} and {label_temperature!r}")
        self.pair, self.comparison_weight, self.temperature = pair, comparison_weight, temperature
        self.label_temperature, self.task_gradient, self.renormalize = label_temperature, task_gradient, renormalize

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        S = ctx.group_size
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        expert_idx_TK = logits_TE.detach().topk(K, dim=-1).indices
        weight_TK = (probs_TE if self.task_gradient else probs_TE.detach()).gather(1, expert_idx_TK)
        if self.renormalize:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        expert_idx_TC, weight_TC = expert_idx_TK, weight_TK
        if self.training and self.comparison_weight:
            if self.pair == "runner_up" and K >= 2:
                partner_T, col = expert_idx_TK[:, 1], 1  # the runner-up is active: no extra row
            else:
                if self.pair == "runner_up":
                    partner_T = logits_TE.detach().topk(2, dim=-1).indices[:, 1]
                else:  # uniform over the E - 1 other experts
                    r_T = torch.randint(0, E - 1, (T,), device=x_TD.device)
                    partner_T = r_T + (r_T >= expert_idx_TK[:, 0]).long()
                # probe row with weight 0: changes nothing in forward, yields dL/dw_j in backward
                expert_idx_TC = torch.cat([expert_idx_TK, partner_T.unsqueeze(1)], dim=1)
                weight_TC = torch.cat([weight_TK, weight_TK.new_zeros(T, 1)], dim=1)
                col = K
            pair_idx_TP = torch.stack([expert_idx_TK[:, 0], partner_T], dim=1)
            out_TP = comparison_gradient(
                weight_TC[:, [0, col]],
                logits_TE.gather(1, pair_idx_TP),
                self.temperature,
                self.comparison_weight,
                self.label_temperature,
            )
            weight_TC = torch.cat([out_TP[:, :1], weight_TC[:, 1:col], out_TP[:, 1:], weight_TC[:, col + 1 :]], dim=1)
        plan = sparse_plan_from_topk(expert_idx_TC, weight_TC, E)
        G = T // S
        losses, total = self.standard_losses(
            logits_TE.view(G, S, E), probs_TE.view(G, S, E), expert_idx_TK.view(G, S, K)
        )
        return RouterOutput(plan=plan, losses=losses, loss=total, probs_TE=probs_TE)
