"""S2MoE: robust sparse MoE via stochastic learning (Do, Le, Tran, "S2MoE: Robust Sparse Mixture of Experts via
Stochastic Learning", arXiv 2503.23007), reference §3.4.

The layer learns from a clean and a noise-augmented copy of its input, mixed by a learned per-token gate; at
inference it activates fewer experts (the abstract's "up to 28%" saving). As assembled in reference §3.4.2::

    mu, sigma  = statistics of x (detached)                                       # Gaussian Noise Module
    x~         = x + scale * (eps1 * x + eps2),  eps1 ~ N(0, sigma^2), eps2 ~ N(mu, sigma^2)
                 (scale = 1: x~ = N1 * x + N2 with N1 ~ N(1, sigma^2), N2 ~ N(mu, sigma^2))
    g          = sigmoid(w_g . x + b_g)                                           # learned mixing gate, per token
    y          = g * SMoE(x) + (1 - g) * SMoE(x~)        # both copies use x's routing (the re-implementation's choice)
    L          = L_task + alpha * L_balance + beta * InfoNCE(x, x~)               # uncertainty loss

Engine hand-off: the router returns ``inputs_RD = cat([x, x~])`` (``R = 2T`` rows) and a sparse plan with two rows
per clean assignment ``(t, e, w)``: ``(source t, token t, e, g_t * w)`` and ``(source T + t, token t, e,
(1 - g_t) * w)``. The engine then computes ``y`` above in one pass, so the gate mixing is folded into the combine
weights and its gradient flows through them.

Inference (``eval()``): no noise and no noisy rows; each token uses its top ``eval_top_k`` experts (1 by default, the
secondary sources' "activates only a single expert") with the clean weights, i.e. the noise-free limit
``x~ = x`` where ``y = SMoE(x)`` whatever ``g``.

What is **unconfirmed** (no official code; reference §3.4 and §13): the noise parameterisation (``noise_stats``:
``"token"`` = per-token mean/std over features, our default because it keeps tokens independent; ``"group"`` =
per-feature statistics over the routing group, closer to the third-party re-implementation), the gate form, reusing
the clean routing for ``x~``, the InfoNCE pairs (we contrast ``x_t`` with ``x~_t`` against the other tokens of a
random subset of at most ``nce_max_tokens``; cosine similarity, temperature 0.1), the loss weights
(``alpha = 0.01``, ``beta = 0.1`` are the re-implementation's), the inference behaviour, and renormalising the K
weights (our choice, so that training top-K and inference top-1 weights are on the same scale).

Shape legend: ``T`` tokens, ``R = 2T`` engine rows in training, ``D`` width, ``E`` experts, ``K`` top-k.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe.routing.base import RouterOutput, RoutingContext, router_logits_fp32
from smoe.routing.gated import GatedRouter
from smoe.routing.options import MIN_SCALE, choice, flag, integer, real
from smoe.routing.plan import SparsePlan, sparse_plan_from_topk
from smoe.routing.registry import register_router
from smoe.routing.token_choice import top_k_choice

__all__ = ["S2MoERouter", "gaussian_noise_copy", "info_nce", "s2moe_plan"]


def gaussian_noise_copy(x_TD: Tensor, group_size: int, scale: float, stats: str) -> Tensor:
    """The Gaussian Noise Module: ``x + scale * (eps1 * x + eps2)`` with detached statistics of ``x``.

    Args:
        x_TD: ``(T, D)`` layer input.
        group_size: ``S`` (for ``stats="group"``).
        scale: noise scale (0 gives ``x`` back exactly).
        stats: ``"token"`` (mean/std of each token over its features) or ``"group"`` (mean/std of each feature
            over the routing group).
    """
    xs = x_TD.detach()
    if stats == "token":
        mu, sigma = xs.mean(dim=-1, keepdim=True), xs.std(dim=-1, unbiased=False, keepdim=True)
    else:
        x_GSD = xs.view(-1, group_size, xs.shape[-1])
        mu = x_GSD.mean(dim=1, keepdim=True).expand_as(x_GSD).reshape_as(xs)
        sigma = x_GSD.std(dim=1, unbiased=False, keepdim=True).expand_as(x_GSD).reshape_as(xs)
    eps1 = torch.randn_like(xs) * sigma
    eps2 = mu + torch.randn_like(xs) * sigma
    return x_TD + scale * (eps1 * x_TD + eps2)


def info_nce(a_ND: Tensor, b_ND: Tensor, temperature: float) -> Tensor:
    """InfoNCE with positives on the diagonal: ``CE(cos(a_i, b_j) / tau, target j = i)``, averaged over ``i``."""
    a = F.normalize(a_ND.float(), dim=-1)
    b = F.normalize(b_ND.float(), dim=-1)
    logits_NN = a @ b.t() / temperature
    return F.cross_entropy(logits_NN, torch.arange(a.shape[0], device=a.device))


def s2moe_plan(expert_idx_TK: Tensor, weight_TK: Tensor, gate_T: Tensor, num_experts: int) -> SparsePlan:
    """Plan over ``2T`` engine rows: clean rows weighted ``g * w``, noisy rows (sources ``T..2T-1``) ``(1 - g) * w``.

    Args:
        expert_idx_TK: ``(T, K)`` experts chosen from the clean input.
        weight_TK: ``(T, K)`` their combine weights.
        gate_T: ``(T,)`` mixing gate ``g`` in ``[0, 1]``.
        num_experts: ``E``.
    """
    T = expert_idx_TK.shape[0]
    g_T1 = gate_T.unsqueeze(1)
    plan = sparse_plan_from_topk(
        torch.cat([expert_idx_TK, expert_idx_TK]), torch.cat([g_T1 * weight_TK, (1.0 - g_T1) * weight_TK]), num_experts
    )
    # rows of the stacked input map back to output tokens: row r < T is token r, row T + t is token t
    return replace(plan, token_idx_N=plan.token_idx_N % T, source_idx_N=plan.token_idx_N, num_tokens=T)


@register_router("s2moe")
class S2MoERouter(GatedRouter):
    """S2MoE (module docstring): clean + noisy copies mixed by a learned gate in training, top-1 at inference.

    Args (beyond :class:`~smoe.routing.gated.GatedRouter`):
        noise_scale: scale of the Gaussian noise (1.0 = the module as described; 0 = a noise-free copy).
        noise_stats: ``"token"`` (default, tokens independent) or ``"group"`` (couples the tokens of a group).
        eval_top_k: experts per token at inference (``None``: ``top_k``).
        renormalize: renormalise the selected weights over the chosen experts.
        uncertainty_loss_weight: ``beta`` of the InfoNCE uncertainty loss (0.1).
        nce_temperature: InfoNCE temperature.
        nce_max_tokens: InfoNCE uses a random subset of at most this many tokens (its memory is quadratic).
    """

    OPTIONS = {
        "noise_scale": real(ge=0),
        "noise_stats": choice("token", "group"),
        "eval_top_k": integer(ge=1),
        "renormalize": flag(),
        "uncertainty_loss_weight": real(ge=0),
        "nce_temperature": real(ge=MIN_SCALE),
        "nce_max_tokens": integer(ge=1),
    }

    def __init__(
        self,
        *,
        noise_scale: float = 1.0,
        noise_stats: str = "token",
        eval_top_k: int | None = 1,
        renormalize: bool = True,
        uncertainty_loss_weight: float = 0.1,
        nce_temperature: float = 0.1,
        nce_max_tokens: int = 256,
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        super().__init__(device=device, dtype=dtype, **kwargs)
        if self.capacity_factor is not None:
            raise ValueError(f"s2moe is dropless; capacity_factor must be None, got {self.capacity_factor!r}")
        if noise_stats not in ("token", "group"):
            raise ValueError(f"noise_stats must be 'token' or 'group', got {noise_stats!r}")
        if noise_scale < 0:
            raise ValueError(f"noise_scale must be >= 0, got {noise_scale!r}")
        if eval_top_k is not None and not 1 <= eval_top_k <= self.num_experts:
            raise ValueError(f"eval_top_k must be None or in [1, num_experts={self.num_experts}], got {eval_top_k!r}")
        if nce_max_tokens < 2:
            raise ValueError(f"nce_max_tokens must be >= 2, got {nce_max_tokens!r}")
        self.noise_scale, self.noise_stats = noise_scale, noise_stats
        self.eval_top_k = self.top_k if eval_top_k is None else eval_top_k
        self.renormalize = renormalize
        self.uncertainty_loss_weight, self.nce_temperature = uncertainty_loss_weight, nce_temperature
        self.nce_max_tokens = nce_max_tokens
        self.mix_gate = nn.Linear(self.dim, 1, device=device, dtype=dtype)
        nn.init.zeros_(self.mix_gate.weight)  # g = 0.5 at initialisation: both copies count equally
        nn.init.zeros_(self.mix_gate.bias)

    @property
    def couples_tokens(self) -> bool:  # type: ignore[override]
        return self.noise_stats == "group"

    def experts_per_token(self, group_size: int | None = None) -> float:
        """Expert rows per token: ``2K`` in training (clean + noisy), ``eval_top_k`` at inference."""
        return float(2 * self.top_k if self.training else self.eval_top_k)

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        T, E = x_TD.shape[0], self.num_experts
        S = ctx.group_size
        G = T // S
        K = self.top_k if self.training else self.eval_top_k
        logits_TE = self.logits(x_TD)
        expert_idx_TK, weight_TK, probs_TE = top_k_choice(logits_TE, K, renormalize=self.renormalize)
        losses, total = self.standard_losses(
            logits_TE.view(G, S, E), probs_TE.view(G, S, E), expert_idx_TK.view(G, S, K)
        )
        if not self.training:
            plan = sparse_plan_from_topk(expert_idx_TK, weight_TK, E)
            return RouterOutput(plan=plan, losses=losses, loss=total, probs_TE=probs_TE)
        x_noisy_TD = gaussian_noise_copy(x_TD, S, self.noise_scale, self.noise_stats)
        gate_T = torch.sigmoid(router_logits_fp32(x_TD, self.mix_gate.weight, self.mix_gate.bias)).squeeze(1)
        plan = s2moe_plan(expert_idx_TK, weight_TK, gate_T, E)
        if self.uncertainty_loss_weight:
            sub = None if T <= self.nce_max_tokens else torch.randperm(T, device=x_TD.device)[: self.nce_max_tokens]
            a, b = (x_TD, x_noisy_TD) if sub is None else (x_TD[sub], x_noisy_TD[sub])
            losses["uncertainty"] = info_nce(a, b, self.nce_temperature)
            total = total + self.uncertainty_loss_weight * losses["uncertainty"]
        return RouterOutput(
            plan=plan,
            losses=losses,
            loss=total,
            probs_TE=probs_TE,
            inputs_RD=torch.cat([x_TD, x_noisy_TD]),
            stats={"mix_gate_mean": gate_T.detach().mean()},
        )
