"""X-MoE hypersphere routing (Chi et al., "On the Representation Collapse of Sparse Mixture of Experts", NeurIPS 2022,
arXiv 2204.09179; public code microsoft/torchscale ``torchscale/component/xmoe/routing.py``), reference §3.2.

A linear router ``s_i = h . e_i`` pulls the token representations into the span of the ``E`` expert embeddings
(representation collapse, reference §3.2.2). X-MoE scores tokens against the experts on a low-dimensional
hypersphere instead (reference §3.2.1, the paper's routing function)::

    s[t, i] = cos(W h_t, e_i) = (W h_t) . e_i / (||W h_t|| ||e_i||)     W: (P, D) no bias, e_i in R^P, P = E/2
    top-k on s (top-1 in the paper)
    g(s_k)  = softmax(s / tau)_k    or    sigmoid(s_k / tau)            tau a learnable scalar
    y       = h + sum_k g(s_k) FFN_k(h)
    L_bal   = E * sum_i f_i * mean_t softmax(s_t / tau0)_i              tau0 FIXED: 0.3 softmax / 0.07 sigmoid

Because ``|s| <= 1``, the tempered logits are bounded, ``|s / tau| <= 1 / tau``, and the routing of a token does
not depend on its norm. The combine weights come from the tempered scores ``s / tau``; the balance loss has its own
fixed temperature ``tau0`` and does not train ``tau``.

``variant="paper"`` (default) is the above. ``variant="torchscale"`` reproduces the public code, which differs
from the paper (reference §3.2.4):

* the routing dimension is hard-coded to 16 (here the default of ``routing_dim``, still overridable);
* the expert embeddings get ``orthogonal_(gain=0.32)`` and, in every training forward, are renormalised *in place*
  to norm 1.5 under ``no_grad``. The logits use ``normalize(e)``, so the renorm never changes an output; it only
  fixes the parameter's scale, hence the size of its gradient and of the optimizer's relative updates. We do it at
  the start of the training ``forward``, before the parameter enters the graph, so the current graph is
  consistent (the fast/reference contract holds); a graph from an *earlier* training forward that is still waiting
  for its ``backward`` is invalidated (autograd raises), as in torchscale. Torchscale also renormalises in
  evaluation; we skip it there (the output is identical) so that evaluation never writes parameters. It is also
  available as :meth:`XMoERouter.renormalize_expert_embeddings_`;
* only the expert embeddings are L2-normalised (the token normalisation line is commented out), so the logits
  ``(W h) . e_i / ||e_i||`` are unbounded and scale with ``||h||``;
* no temperature at all (``_get_gating_temperature`` reads a ``gating_t`` that is never created); softmax gating;
* the aux loss is fairseq's GShard ``l_aux = E^2 mean(me * ce)`` on the softmax of the *un-tempered* logits, with
  ``ce`` counting top-1 choices only (``TEMPERATURE_FOR_L_UAX = 0.07`` is defined but unused);
* ``normalize_gate_prob_before_dropping=True``: for ``K >= 2`` the kept weights are renormalised over the ``K``
  choices before capacity dropping (top-1 keeps the raw softmax gate, as ``top1gating``);
* ``second_expert_policy="random"``: the second choice is kept with probability ``2 * g_2`` (before capacity, so a
  dropped second choice takes no buffer slot). In training only: fairseq samples in evaluation too, we keep every
  second choice there so that evaluation is deterministic.

Skipped on purpose: the eval capacity ``ceil(0.25 * T)`` and the training capacities ``cf * ceil(S/E)`` (top-1) /
``2 * ceil(S/E)`` (top-2) of fairseq (capacity here is :func:`smoe.routing.capacity.compute_capacity`, as every
router); ``_make_finite`` (our scores are finite for finite inputs); padding masks; Tutel; logging metadata.

What is confirmed and what is not:

* The routing function, ``P = E/2`` (``N/2``, the best of the sweep N/4..4N), the learnable ``tau``, softmax or
  sigmoid gating, the balance loss with fixed ``tau0 = 0.3 / 0.07`` and ``alpha = 1e-2`` (Table 5, marginally best)
  are from the paper text (NeurIPS submission version; the camera-ready may differ).
* The initial value of the learnable ``tau`` is in the paper's appendix, **unconfirmed**: we start it at ``tau0``
  (0.3 softmax / 0.07 sigmoid), so that gates and balance loss start equally sharp. We learn ``log tau`` (positive
  by construction; a floor ``min_temperature`` keeps ``1/tau`` finite); whether the paper learned ``tau`` or its
  log is **unconfirmed**.
* The paper's initialisation of ``W`` and ``e`` is **unconfirmed** (not in the text we have): we use
  ``nn.Linear``'s default for ``W`` (as torchscale's ``wg_reduction``) and torchscale's orthogonal ``gain=0.32`` for
  ``e`` in both variants (the paper variant's forward ignores the scale of either).
* Ours: ``P >= 2`` in the paper variant (a 1-d cosine only takes the values +-1), ``P = max(2, E // 2)``; the
  choice is ``top-k`` of ``s`` rather than of the gates (:func:`xmoe_top_k`: saturated float32 gates would tie at a
  small ``tau``); each token is divided by its detached max ``|x|`` before the projection, so that ``||W x||`` does
  not overflow (a no-op in exact arithmetic, value and gradients included); all router math in float32.
* For ``K > 1`` (the paper is top-1) the balance loss counts all ``K`` choices, normalised by ``S*K``
  (:func:`~smoe.routing.losses.switch_balance_loss`); the torchscale variant counts top-1 only, as fairseq.
* The X-MoE fine-tuning recipe (freeze router and experts) is a training choice, not a router option.

Shape legend: ``T`` tokens in routing order, ``D`` width, ``P`` routing (hypersphere) dimension, ``E`` experts,
``K`` top-k, ``G`` groups of ``S`` tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe.routing.base import Router, RouterOutput, RoutingContext
from smoe.routing.capacity import capacity_keep_mask, compute_capacity
from smoe.routing.losses import switch_balance_loss
from smoe.routing.options import MIN_SCALE, choice, flag, integer, real
from smoe.routing.plan import sparse_plan_from_topk
from smoe.routing.registry import register_router

__all__ = ["XMoERouter", "xmoe_scores", "xmoe_top_k", "xmoe_balance_loss"]

#: fixed balance-loss temperature tau0 by gating function (paper)
BALANCE_TEMPERATURE = {"softmax": 0.3, "sigmoid": 0.07}
#: torchscale's hard-coded routing dimension and expert-embedding norm / init gain
TORCHSCALE_ROUTING_DIM = 16
TORCHSCALE_EXPERT_NORM = 1.5
EXPERT_INIT_GAIN = 0.32


def xmoe_scores(
    x_TD: Tensor,
    projection_PD: Tensor,
    expert_embedding_EP: Tensor,
    *,
    normalize_tokens: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Hypersphere routing scores ``s[t, i] = cos(W x_t, e_i)`` in float32 whatever the autocast state.

    Args:
        x_TD: ``(T, D)`` router inputs.
        projection_PD: ``(P, D)`` dimension reduction ``W`` (no bias).
        expert_embedding_EP: ``(E, P)`` expert embeddings ``e_i``.
        normalize_tokens: L2-normalise the projected tokens (paper). ``False`` is torchscale's
            ``(W x_t) . e_i / ||e_i||``, unbounded and proportional to ``||x_t||``.
        eps: floor of the norms (``F.normalize``); a zero vector scores 0 against every expert.

    Returns:
        ``(T, E)`` float32 scores, in ``[-1, 1]`` (up to rounding) when ``normalize_tokens``.
    """
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        x_TD = x_TD.float()
        if normalize_tokens:
            # Overflow guard: the cosine ignores any positive per-token scale, so divide by the (detached) max |x|
            # first. Then ||W x|| cannot overflow for any finite input, the eps floor acts the same at every token
            # norm, and value and gradients are unchanged (normalize is homogeneous of degree 0).
            scale_T1 = x_TD.detach().abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            x_TD = x_TD / scale_T1
        h_TP = F.linear(x_TD, projection_PD.float())
        if normalize_tokens:
            h_TP = F.normalize(h_TP, dim=-1, eps=eps)
        e_EP = F.normalize(expert_embedding_EP.float(), dim=-1, eps=eps)
        return h_TP @ e_EP.T


def xmoe_top_k(
    scores_TE: Tensor, top_k: int, temperature: Tensor | None, *, gating: str = "softmax", renormalize: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k choice on the scores, combine weights from the tempered scores ``s / tau``.

    The choice is made on ``s`` itself (the paper's ``k = argmax_i s_i``), not on the gates: with a small ``tau``
    the float32 gates saturate (``sigmoid(s/tau)`` rounds to 1, ``softmax`` underflows to 0) and would tie, while
    ``s`` orders the experts the same way (``tau > 0``) without ties. Otherwise this is
    :func:`~smoe.routing.token_choice.top_k_choice` (``order="softmax_topk"``).

    Args:
        scores_TE: ``(T, E)`` float32 scores.
        top_k: ``K``.
        temperature: scalar ``tau`` (``None``: 1, the torchscale variant).
        gating: ``"softmax"``: ``softmax(s / tau)`` over all experts, the ``K`` chosen entries kept;
            ``"sigmoid"``: ``sigmoid(s_k / tau)``.
        renormalize: divide the kept weights by their sum.

    Returns:
        ``(expert_idx_TK, weight_TK, probs_TE)``: chosen experts, combine weights, and the per-token gate
        distribution (the softmax, or the sigmoids normalised to sum to one) for diagnostics.
    """
    logits_TE = scores_TE if temperature is None else scores_TE / temperature
    expert_idx_TK = scores_TE.detach().topk(top_k, dim=-1).indices
    if gating == "softmax":
        probs_TE = logits_TE.softmax(dim=-1)
        weight_TK = probs_TE.gather(1, expert_idx_TK)
    elif gating == "sigmoid":
        gates_TE = torch.sigmoid(logits_TE)
        weight_TK = gates_TE.gather(1, expert_idx_TK)
        probs_TE = F.logsigmoid(logits_TE).softmax(dim=-1)  # gates / sum(gates), finite when all underflow
    else:
        raise ValueError(f"gating must be 'softmax' or 'sigmoid', got {gating!r}")
    if renormalize:
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return expert_idx_TK, weight_TK, probs_TE


def xmoe_balance_loss(scores_GSE: Tensor, expert_idx_GSK: Tensor, temperature: float) -> Tensor:
    """X-MoE balance loss ``E * sum_i f_i * mean_t softmax(s_t / tau0)_i`` with a *fixed* ``tau0``, per group.

    This is :func:`~smoe.routing.losses.switch_balance_loss` on ``softmax(scores / tau0)``: ``f_i`` (no gradient)
    is the share of the group's assignments that chose expert ``i``; gradients reach the scores only, never the
    gating temperature.

    Args:
        scores_GSE: ``(G, S, E)`` float32 un-tempered scores (cosines in the paper variant).
        expert_idx_GSK: ``(G, S, K)`` selected experts.
        temperature: ``tau0`` (0.3 with softmax gating, 0.07 with sigmoid gating; 1.0 for torchscale).

    Returns:
        Scalar loss averaged over groups; 1.0 when both the choices and the probabilities are uniform.
    """
    return switch_balance_loss((scores_GSE / temperature).softmax(dim=-1), expert_idx_GSK)


@register_router("xmoe")
class XMoERouter(Router):
    """X-MoE: top-k on cosine scores in a low-dimensional routing space, learnable temperature (module docstring).

    Args:
        dim: model width ``D``.
        num_experts: ``E``.
        top_k: ``K`` (1 in the paper, 2 in torchscale's ``Top2Gate``).
        capacity_factor: ``None`` (dropless) or the capacity factor; capacity ``ceil(cf*S*K/E)`` per group, placed
            all top-1 choices first, then by position (:func:`~smoe.routing.capacity.capacity_keep_mask`).
        variant: ``"paper"`` (default) or ``"torchscale"`` (the public code, module docstring).
        routing_dim: ``P``; default ``max(2, E // 2)`` (paper), 16 (torchscale).
        gating: ``"softmax"`` (``softmax(s / tau)`` over all experts, the top-k entries kept) or ``"sigmoid"``
            (``sigmoid(s_k / tau)``). Torchscale: softmax only.
        temperature_init: initial ``tau`` (paper variant); default ``tau0`` of the gating (unconfirmed).
        learn_temperature: learn ``tau`` (default, paper variant) or keep it fixed at ``temperature_init``.
        min_temperature: floor of ``tau``, so that ``1/tau`` stays finite (1e-4, torchscale's unused stub's eps).
        balance_temperature: ``tau0`` of the balance loss; default 0.3 (softmax) / 0.07 (sigmoid). Torchscale: none
            (the loss uses the un-tempered softmax).
        balance_loss_weight: ``alpha``; 1e-2 as Switch and the paper's best (Table 5).
        renormalize: divide the kept weights by their sum; default ``False`` (paper), ``True`` for ``K >= 2`` in
            torchscale (``normalize_gate_prob_before_dropping``).
        second_expert_policy: ``"all"`` or ``"random"`` (keep the second choice with probability ``2 * g_2`` in
            training; ``K <= 2``); default ``"random"`` for torchscale with ``K == 2``, else ``"all"``.
        capacity_multiple_of: with a ``capacity_factor``, round the capacity up to a multiple of this
            (:func:`~smoe.routing.capacity.compute_capacity`); default 1, vmoe's default is 4.
        device: parameter device.
        dtype: parameter dtype (the math runs in float32).
    """

    OPTIONS = {
        "variant": choice("paper", "torchscale"),
        "routing_dim": integer(ge=1, none=True),
        "gating": choice("softmax", "sigmoid"),
        "temperature_init": real(ge=MIN_SCALE, none=True),
        "learn_temperature": flag(none=True),
        "min_temperature": real(ge=MIN_SCALE),
        "balance_temperature": real(ge=MIN_SCALE, none=True),
        "balance_loss_weight": real(ge=0),
        "renormalize": flag(none=True),
        "second_expert_policy": choice("all", "random", none=True),
        "capacity_multiple_of": integer(ge=1),
    }

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float | None = None,
        variant: str = "paper",
        routing_dim: int | None = None,
        gating: str = "softmax",
        temperature_init: float | None = None,
        learn_temperature: bool | None = None,
        min_temperature: float = 1e-4,
        balance_temperature: float | None = None,
        balance_loss_weight: float = 0.01,
        renormalize: bool | None = None,
        second_expert_policy: str | None = None,
        capacity_multiple_of: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, top_k=top_k)
        E = num_experts
        if variant not in ("paper", "torchscale"):
            raise ValueError(f"variant must be 'paper' or 'torchscale', got {variant!r}")
        if gating not in ("softmax", "sigmoid"):
            raise ValueError(f"gating must be 'softmax' or 'sigmoid', got {gating!r}")
        if not 1 <= top_k <= E:
            raise ValueError(f"top_k ({top_k}) must be in [1, num_experts={E}]")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be None (dropless) or > 0, got {capacity_factor!r}")
        if balance_loss_weight < 0:
            raise ValueError(f"balance_loss_weight must be >= 0, got {balance_loss_weight!r}")
        if not min_temperature > 0:
            raise ValueError(f"min_temperature must be > 0, got {min_temperature!r}")
        torchscale = variant == "torchscale"
        if torchscale:
            # the public code has none of these: refuse them rather than ignore them
            if gating != "softmax":
                raise ValueError(f"variant='torchscale' gates with softmax only, got gating={gating!r}")
            for name, value in (("temperature_init", temperature_init), ("balance_temperature", balance_temperature)):
                if value is not None:
                    raise ValueError(f"variant='torchscale' has no temperature, got {name}={value!r}")
            if learn_temperature:
                raise ValueError(
                    f"variant='torchscale' has no temperature, got learn_temperature={learn_temperature!r}"
                )
        if routing_dim is None:
            routing_dim = TORCHSCALE_ROUTING_DIM if torchscale else max(2, E // 2)
        if routing_dim < (1 if torchscale else 2):
            raise ValueError(
                f"routing_dim must be >= {1 if torchscale else 2} (a 1-d cosine is only +-1), got {routing_dim!r}"
            )
        if second_expert_policy is None:
            second_expert_policy = "random" if torchscale and top_k == 2 else "all"
        if second_expert_policy not in ("all", "random"):
            raise ValueError(f"second_expert_policy must be 'all' or 'random', got {second_expert_policy!r}")
        if second_expert_policy == "random" and top_k > 2:
            raise ValueError(f"second_expert_policy='random' is defined for top_k <= 2, got top_k={top_k}")
        self.capacity_factor = capacity_factor
        self.capacity_multiple_of = capacity_multiple_of
        self.variant, self.gating, self.routing_dim = variant, gating, routing_dim
        self.balance_loss_weight = balance_loss_weight
        self.renormalize = (torchscale and top_k >= 2) if renormalize is None else renormalize
        self.second_expert_policy = second_expert_policy
        self.min_temperature = min_temperature
        self.projection = nn.Linear(dim, routing_dim, bias=False, device=device, dtype=dtype)
        self.expert_embedding_EP = nn.Parameter(torch.empty(E, routing_dim, device=device, dtype=dtype))
        nn.init.orthogonal_(self.expert_embedding_EP, gain=EXPERT_INIT_GAIN)
        if torchscale:
            self.balance_temperature = 1.0  # the un-tempered softmax
            self.log_temperature = None
            return
        self.balance_temperature = BALANCE_TEMPERATURE[gating] if balance_temperature is None else balance_temperature
        if not self.balance_temperature > 0:
            raise ValueError(f"balance_temperature must be > 0, got {balance_temperature!r}")
        temperature_init = BALANCE_TEMPERATURE[gating] if temperature_init is None else temperature_init
        if not temperature_init >= min_temperature:
            raise ValueError(f"temperature_init must be >= min_temperature={min_temperature}, got {temperature_init!r}")
        log_tau = torch.full((), math.log(temperature_init), device=device, dtype=dtype)
        if learn_temperature is None or learn_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau, persistent=True)

    capacity_options = frozenset({"capacity_factor"})

    @property
    def couples_tokens(self) -> bool:  # type: ignore[override]
        # capacity dropping makes a token's fate depend on the other tokens of its group (as token choice)
        return self.capacity_factor is not None

    def temperature(self) -> Tensor | None:
        """Gating temperature ``tau = max(exp(log_tau), min_temperature)``, a float32 scalar (``None``: torchscale)."""
        if self.log_temperature is None:
            return None
        return self.log_temperature.float().exp().clamp_min(self.min_temperature)

    def scores(self, x_TD: Tensor) -> Tensor:
        """``(T, E)`` float32 un-tempered scores: cosines (paper) or ``(W x) . e / ||e||`` (torchscale)."""
        return xmoe_scores(
            x_TD, self.projection.weight, self.expert_embedding_EP, normalize_tokens=self.variant == "paper"
        )

    def logits(self, x_TD: Tensor) -> Tensor:
        """``(T, E)`` float32 logits the gating sees: ``s / tau`` (paper, ``|s / tau| <= 1 / tau``) or ``s``."""
        scores_TE = self.scores(x_TD)
        tau = self.temperature()
        return scores_TE if tau is None else scores_TE / tau

    @torch.no_grad()
    def renormalize_expert_embeddings_(self) -> None:
        """Torchscale's ``wg *= 1.5 / ||wg||_row``, in place (module docstring)."""
        w_EP = self.expert_embedding_EP
        w_EP.mul_(TORCHSCALE_EXPERT_NORM / w_EP.norm(dim=1, keepdim=True).clamp_min(1e-4))

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        S = ctx.group_size
        G = T // S
        if self.training and self.variant == "torchscale":
            self.renormalize_expert_embeddings_()  # before the parameter enters this forward's graph
        scores_TE = self.scores(x_TD)
        tau = self.temperature()
        expert_idx_TK, weight_TK, probs_TE = xmoe_top_k(
            scores_TE, K, tau, gating=self.gating, renormalize=self.renormalize
        )
        sampled_TK = None
        if self.training and self.second_expert_policy == "random" and K == 2:
            # fairseq top2gating: keep the 2nd choice with probability 2 * g_2 (g_2 <= 1/2 once renormalised)
            sampled_T = 2.0 * weight_TK[:, 1].detach() > torch.rand_like(weight_TK[:, 1], dtype=torch.float32)
            sampled_TK = torch.stack([torch.ones_like(sampled_T), sampled_T], dim=1)
        keep_TK = sampled_TK
        if self.capacity_factor is not None:
            capacity = compute_capacity(S, E, self.capacity_factor, K, multiple_of=self.capacity_multiple_of)
            if sampled_TK is None:
                keep_TK = capacity_keep_mask(expert_idx_TK.view(G, S, K), capacity, E).view(T, K)
            else:
                # an unsampled choice takes no buffer slot: park it on a dummy expert E before placing
                parked_TK = expert_idx_TK.masked_fill(~sampled_TK, E)
                keep_TK = capacity_keep_mask(parked_TK.view(G, S, K), capacity, E + 1).view(T, K) & sampled_TK
        plan = sparse_plan_from_topk(expert_idx_TK, weight_TK, E, keep_TK)
        losses: dict[str, Tensor] = {}
        total = scores_TE.new_zeros(())
        if self.balance_loss_weight:
            # paper: all K choices, softmax(s / tau0); torchscale: fairseq's l_aux, top-1 choices, softmax(s)
            idx_GSK = expert_idx_TK.view(G, S, K)
            if self.variant == "torchscale":
                idx_GSK = idx_GSK[..., :1]
            losses["balance"] = xmoe_balance_loss(scores_TE.view(G, S, E), idx_GSK, self.balance_temperature)
            total = total + self.balance_loss_weight * losses["balance"]
        stats = {} if tau is None else {"temperature": tau.detach()}
        return RouterOutput(plan=plan, losses=losses, loss=total, probs_TE=probs_TE, stats=stats)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, variant={self.variant!r}, routing_dim={self.routing_dim}, "
            f"gating={self.gating!r}, capacity_factor={self.capacity_factor}"
        )
