"""Soft MoE (Puigcerver, Riquelme, Mustafa, Houlsby, "From Sparse to Soft Mixtures of Experts", ICLR 2024,
arXiv 2308.00951), reference §6.

No token is assigned to an expert. Each expert owns ``C`` *slots*. In every routing group, every slot is a convex
combination of the group's tokens. Every token's output is a convex combination of the outputs of all slots. Both
mixtures come from one logit matrix (paper eqs. 1-2, Algorithm 1, with the normalisation of Algorithm 2)::

    x^      = x * rsqrt(sum_d x^2 + eps)                    # each token to unit norm                  (Alg. 2)
    phi^    = scale * phi * rsqrt(sum_d phi^2 + eps)        # each slot vector to unit norm, ONE scalar  (Alg. 2)
    L[s, e, c]  = <x^_s, phi^_{e,c}>                         # (S, E, C) logits                         (Alg. 1)
    D[s, e, c]  = softmax_s(L[:, e, c])[s]                  # dispatch: each slot mixes the TOKENS      (eq. 1)
    C[s, e, c]  = softmax_{(e, c)}(L[s])[e, c]              # combine: each token mixes ALL E*C slots   (eq. 2)
    x~_{e,c}    = sum_s D[s, e, c] x_s                       # the RAW x is mixed, not x^
    y_s         = sum_{e,c} C[s, e, c] f_e(x~_{e,c})

The router returns ``(D, C)`` as a :class:`~smoe.routing.plan.DensePlan`. The engine does the mixing on the layer
input, which is the raw ``x``: the router normalises only its own copy. vmoe does the same: the ``SoftRouter``
normalises a local copy, and ``MlpMoeBlock`` hands the original inputs to the dispatcher.

Design decisions (each is documented on :class:`SoftMoERouter` too):

* **Slots per expert** ``C``. The slot parameters ``phi`` have a fixed shape ``(D, E, C)`` from construction, so
  ``C`` must be known then. ``num_slots`` gives it directly. Otherwise ``capacity_factor`` together with
  ``tokens_per_group`` (the group size ``S`` the layer will use) gives ``C = max(1, round(cf * S / E))``. That is
  vmoe's ``compute_capacity(..., 'round', multiple_of=1)``; vmoe raises below 1, we clamp to 1. With neither,
  ``C = 1``: one slot per expert, the setting of the paper's long runs and its best one (§6.2). vmoe's own
  default is ``capacity_factor=1.0``, i.e. ``C = round(S / E)``. The layer's ``capacity_factor=None`` means
  "dropless" here and cannot express that without ``S``. Once ``C`` is fixed, groups of any size work: a group
  smaller than ``E*C`` is fine, and with ``S = 1`` every dispatch weight is 1.
* **top_k** is accepted for the common router constructor and not used by the routing. Soft MoE has no
  per-token choice: every token receives a share of every slot. Expert compute per group is ``E*C`` slot
  evaluations, whatever ``S`` is. It matches top-``K`` token choice (``S*K`` evaluations) only when
  ``E*C = S*K``. For that match pass ``capacity_factor=K`` with ``tokens_per_group=S``.
* **Normalisation** is vmoe's ``x * rsqrt(sum x^2 + 1e-6)``. The paper's Algorithm 2 writes
  ``x / (||x|| + 1e-6)``, which differs numerically by ~1e-6 relative for unit-scale vectors. ``scale``
  multiplies the normalised ``phi``, as in the paper. vmoe multiplies it into whichever operand is smaller,
  which is the same product.
* **Precision**: the router math runs with autocast off, in float32, or in float64 when the input is float64.
  The float64 case lets gradients be checked numerically. The plan stays in that dtype, and the engine casts it
  to the compute dtype at use.
* **Noise**: optional ``noise_std * N(0, 1)`` on the logits, in training only (vmoe ``SoftRouter.add_noise``: not
  divided by ``E``, unlike V-MoE's gate noise). The same noisy logits feed both softmaxes. The default is 0 (off).
* **No auxiliary loss** (vmoe: ``auxiliary_loss = 0``).
* **Padding**: every token of a group takes part in the dispatch softmax; there is no mask. The paper does not
  address padding (reference §6.4).

What is confirmed and what is not:

* Confirmed from the paper text and the authors' code (vmoe ``projects/soft_moe/router.py``):
  * the two softmax axes;
  * the normalisation of ``x`` and of ``phi`` over ``D``, with one learnable scalar ``scale`` initialised to 1;
  * mixing the raw ``x``;
  * noise on the logits, and no auxiliary loss;
  * ``phi ~ lecun_normal`` with shape ``(D, E, C)``;
  * the rule ``round(cf * S / E)``.
* The init scale follows JAX's fan rule for a 3-d ``(D, E, C)`` kernel (``in_axis=-2``): fan-in ``= E * D``,
  ``std = 1/sqrt(E*D)``, truncated at 2 std. We read this off the code; the paper does not state it. ``phi``
  is normalised in the forward pass, so only its direction reaches the output. Its norm still sets the
  effective step size of the optimiser.
* The JFT config puts weight decay 0.03 on ``scale``. Our optimiser decays only tensors of rank >= 2, so
  ``scale`` gets none: a **deviation**.
* vmoe runs the dispatch and combine einsums in bfloat16 (``Bfloat16Dispatcher``). We keep the plan in float32;
  the engine casts it to the compute dtype.

Causality: every output depends on every token of its group (``couples_tokens``). Causal or auto-regressive use
is an open problem of the paper. In a causal model use ``group_mode="position"``: a group then holds the ``B``
tokens at one position, which is causal-safe but mixes tokens across sequences. Per-image routing is
``group_mode="sequence"``; in that mode an image's output does not depend on the other images of the batch.

Shape legend: ``T`` tokens in routing order, ``G`` groups of ``S`` tokens (``T = G*S``), ``D`` width, ``E`` experts,
``C`` slots per expert.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from smoe.routing.base import Router, RouterOutput, RoutingContext
from smoe.routing.capacity import compute_capacity
from smoe.routing.options import integer, real
from smoe.routing.plan import DensePlan
from smoe.routing.registry import register_router

__all__ = ["SoftMoERouter", "soft_moe_plan", "l2_normalize"]

#: vmoe ``normalize(..., eps=1e-6)``: inside the rsqrt, so a zero vector maps to zero instead of NaN
NORM_EPS = 1e-6
#: std of a standard normal truncated to [-2, 2] (JAX ``variance_scaling(..., "truncated_normal")`` divides by it)
_TRUNCATED_NORMAL_STD = 0.87962566103423978


def l2_normalize(x: Tensor, dim: int, eps: float = NORM_EPS) -> Tensor:
    """``x * rsqrt(sum(x^2, dim) + eps)`` (vmoe ``normalize``; the paper's Algorithm 2 up to where ``eps`` sits)."""
    return x * torch.rsqrt(x.square().sum(dim=dim, keepdim=True) + eps)


def soft_moe_plan(
    x_GSD: Tensor,
    slot_embed_DEC: Tensor,
    scale: Tensor,
    *,
    noise_GSEC: Tensor | None = None,
    eps: float = NORM_EPS,
) -> DensePlan:
    """Soft MoE dispatch and combine weights (paper eqs. 1-2, Algorithms 1-2).

    ``L[g, s, e, c] = <x^[g, s], scale * phi^[:, e, c]>`` with ``x^`` and ``phi^`` unit-normalised over ``D``.
    Then ``dispatch = softmax(L)`` over the tokens ``s`` of each group, separately for each slot ``(e, c)``, and
    ``combine = softmax(L)`` jointly over all slots ``(e, c)``, separately for each token.

    Args:
        x_GSD: ``(G, S, D)`` tokens by routing group. Only their direction matters here; the engine mixes the raw
            tokens.
        slot_embed_DEC: ``(D, E, C)`` slot parameters ``phi`` (vmoe ``mu``), one ``D``-vector per slot.
        scale: ``()`` the learnable scalar that multiplies the normalised slot vectors (the softmax temperature).
        noise_GSEC: optional ``(G, S, E, C)`` noise to add to the logits, already scaled by its std.
        eps: normalisation epsilon, inside the rsqrt.

    Returns:
        A :class:`DensePlan`. ``dispatch_GSEC.sum(1) == 1`` for every ``(g, e, c)``, and
        ``combine_GSEC.sum((2, 3)) == 1`` for every ``(g, s)``. Both are in the dtype of the inputs.
    """
    G, S, _ = x_GSD.shape
    _, E, C = slot_embed_DEC.shape
    x_hat_GSD = l2_normalize(x_GSD, dim=-1, eps=eps)
    phi_hat_DEC = scale * l2_normalize(slot_embed_DEC, dim=0, eps=eps)
    logits_GSEC = torch.einsum("gsd,dec->gsec", x_hat_GSD, phi_hat_DEC)  # vmoe 'gmd,dnp->gmnp'
    if noise_GSEC is not None:
        logits_GSEC = logits_GSEC + noise_GSEC
    # eq. (1): softmax over the columns of the (S, E*C) logit matrix, i.e. over the group's tokens, once per slot
    dispatch_GSEC = logits_GSEC.softmax(dim=1)
    # eq. (2): softmax over the rows, i.e. jointly over all E*C slots (experts and their slots), once per token
    combine_GSEC = logits_GSEC.reshape(G, S, E * C).softmax(dim=-1).view(G, S, E, C)
    return DensePlan(dispatch_GSEC=dispatch_GSEC, combine_GSEC=combine_GSEC)


@register_router("soft")
class SoftMoERouter(Router):
    """Soft MoE: every slot mixes the group's tokens, and every token mixes all slots' outputs (module docstring).

    Args:
        dim: model width ``D``.
        num_experts: ``E``.
        top_k: accepted for the common constructor; not used by the routing (module docstring).
        capacity_factor: ``None``, or ``cf > 0`` to derive ``C = max(1, round(cf * tokens_per_group / E))``
            (vmoe). This needs ``tokens_per_group`` and excludes ``num_slots``.
        num_slots: slots per expert ``C``, an integer ``>= 1``. ``None``: from ``capacity_factor`` if one is given,
            else 1 (the paper's long runs).
        tokens_per_group: the routing group size ``S`` the layer will use. It is required with
            ``capacity_factor`` and allowed only then. ``C`` is fixed at construction; groups of another size keep
            it (vmoe would refuse them, since its ``phi`` shape would change).
        noise_std: std of gaussian noise added to the logits in training (vmoe ``noise_std``); 0 means off.
        device, dtype: of the parameters.

    Parameters:
        slot_embed_DEC: ``(D, E, C)`` slot vectors ``phi`` (vmoe ``mu``), JAX ``lecun_normal`` with fan-in ``E*D``.
        scale: ``()`` scalar multiplying the normalised slot vectors, initialised to 1.
    """

    couples_tokens = True
    plan_kind = "dense"

    OPTIONS = {
        "num_slots": integer(ge=1, none=True),
        "tokens_per_group": integer(ge=1, none=True),
        "noise_std": real(ge=0),
    }

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float | None = None,
        num_slots: int | None = None,
        tokens_per_group: int | None = None,
        noise_std: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, top_k=top_k)
        if num_slots is not None and (isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1):
            raise ValueError(f"num_slots must be None or an integer >= 1, got {num_slots!r}")
        if tokens_per_group is not None and (
            isinstance(tokens_per_group, bool) or not isinstance(tokens_per_group, int) or tokens_per_group < 1
        ):
            raise ValueError(f"tokens_per_group must be None or an integer >= 1, got {tokens_per_group!r}")
        if not (isinstance(noise_std, int | float) and math.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        if capacity_factor is not None:
            if not (isinstance(capacity_factor, int | float) and capacity_factor > 0):
                raise ValueError(f"capacity_factor must be None or > 0, got {capacity_factor!r}")
            if num_slots is not None:
                raise ValueError(
                    f"soft router: give either num_slots ({num_slots!r}) or capacity_factor ({capacity_factor!r}), "
                    "not both"
                )
            if tokens_per_group is None:
                raise ValueError(
                    f"soft router: capacity_factor={capacity_factor!r} sets num_slots = round(cf * S / E), which needs "
                    "the group size S as tokens_per_group=...; or pass num_slots instead"
                )
            # vmoe compute_capacity(S, E, cf, ceil_or_round='round', multiple_of=1); clamped to >= 1
            num_slots = compute_capacity(tokens_per_group, num_experts, capacity_factor, 1, rounding="round")
        elif tokens_per_group is not None:
            raise ValueError(
                f"soft router: tokens_per_group={tokens_per_group!r} is only used with a capacity_factor "
                "(to derive num_slots); pass num_slots directly instead"
            )
        # Stored under another name than `capacity_factor` (which stays None): the slot count is a parameter shape and
        # cannot change at evaluation, so this router declares no capacity_options.
        self.slot_capacity_factor = capacity_factor
        self.num_slots = 1 if num_slots is None else num_slots
        self.tokens_per_group, self.noise_std = tokens_per_group, float(noise_std)
        dd = {"device": device, "dtype": dtype}
        self.slot_embed_DEC = nn.Parameter(torch.empty(dim, num_experts, self.num_slots, **dd))
        self.scale = nn.Parameter(torch.ones((), **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """JAX ``lecun_normal`` for a ``(D, E, C)`` kernel (fan-in ``E*D``, truncated at 2 std); ``scale = 1``."""
        std = (1.0 / (self.num_experts * self.dim)) ** 0.5 / _TRUNCATED_NORMAL_STD
        nn.init.trunc_normal_(self.slot_embed_DEC, mean=0.0, std=std, a=-2 * std, b=2 * std)
        nn.init.ones_(self.scale)

    def experts_per_token(self, group_size: int | None = None) -> float:
        """Expert evaluations per token, ``E*C/S``, for the FLOP accounting. ``S`` is ``tokens_per_group`` when given,
        else the layer's ``group_size`` when the model's shapes fix it; when neither is known the count falls back
        to ``top_k``."""
        S = self.tokens_per_group if self.tokens_per_group is not None else group_size
        if S is None:
            return float(self.top_k)
        return self.num_experts * self.num_slots / S

    def extra_flops_per_token(self) -> float:
        """The slot mixing: dispatch (``slots = D^T X``) and combine (``Y = C Y~``), ``E*C*D`` multiply-adds per token
        each."""
        return 2.0 * 2 * self.num_experts * self.num_slots * self.dim

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        T, E, C = x_TD.shape[0], self.num_experts, self.num_slots
        S = ctx.group_size
        if S < 1 or T % S:
            raise ValueError(f"soft router: {T} tokens do not split into groups of group_size={S}")
        G = T // S
        # router math in float32 whatever the autocast state; float64 stays float64 (exact tests, gradcheck)
        compute_dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_GSD = x_TD.to(compute_dtype).view(G, S, -1)
            noise_GSEC = None
            if self.training and self.noise_std > 0:
                noise_GSEC = self.noise_std * torch.randn(G, S, E, C, device=x_TD.device, dtype=compute_dtype)
            plan = soft_moe_plan(
                x_GSD, self.slot_embed_DEC.to(compute_dtype), self.scale.to(compute_dtype), noise_GSEC=noise_GSEC
            )
        # per-token distribution over experts: the combine weights summed over each expert's slots (sums to 1)
        probs_TE = plan.combine_GSEC.sum(dim=-1).reshape(T, E)
        with torch.no_grad():  # vmoe SoftRouter.get_metrics: how peaked the two softmaxes are
            stats = {
                "dispatch_weights_max_mean": plan.dispatch_GSEC.amax(dim=1).mean(),
                "combine_weights_max_mean": plan.combine_GSEC.flatten(2).amax(dim=-1).mean(),
            }
        zero = x_TD.new_zeros((), dtype=torch.float32)  # no auxiliary loss (vmoe auxiliary_loss = 0)
        return RouterOutput(plan=plan, losses={}, loss=zero, probs_TE=probs_TE, stats=stats)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, num_slots={self.num_slots}, "
            f"tokens_per_group={self.tokens_per_group}, noise_std={self.noise_std}"
        )
