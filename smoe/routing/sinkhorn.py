"""Sinkhorn balanced routing: BASE / S-BASE style (Clark et al., "Unified Scaling Laws for Routed Language Models",
ICML 2022; Megatron-Core ``sinkhorn_load_balancing``) and the Sinkhorn routers of "Routers in Vision Mixture of
Experts" (Liu, Blondel, Riquelme, Puigcerver, TMLR 2024; vmoe ``KLProjection*Router``), reference §5.2, §5.3.2.

The solver, :func:`sinkhorn_plan`, computes the entropic optimal-transport plan of every routing group::

    P = argmax_{P >= 0} <P, scores> - eps * <P, log P>   s.t.  P 1_E = a 1_S  (rows),  P^T 1_S = b 1_E  (columns)
      = diag(u) exp(scores / eps) diag(v)                  with a = 1 and b = a * S / E by default

i.e. the KL projection of ``exp(scores / eps)`` onto the balanced plans (``cost = -scores``). It runs in float32
and in the log domain (no overflow of ``exp(scores / eps)`` for small ``eps``), batched over the ``G`` groups, and
ends on a row update, so rows are exact and columns are within ``tol`` when it stops on the tolerance.
:func:`sinkhorn_plan_reference` is the plain-domain specification it is tested against.

The router ``sinkhorn`` uses the plan **for selection only** (under ``no_grad``); combine weights come from the raw
router scores, so gradients reach the gate exactly as in top-k routing:

* training: ``idx = top-k(P)`` per token (``variant="token_choice"``, S-BASE / Megatron / vmoe Sinkhorn TC) or
  ``idx = top-c(P)`` per expert (``variant="expert_choice"``, vmoe Sinkhorn EC, ``c = ceil(cf * S / E)``, ``cf``
  defaulting to ``top_k`` as in :mod:`~smoe.routing.expert_choice`); weights ``softmax(logits)`` at ``idx``.
* evaluation: plain top-k on the logits (Megatron) -- or the Sinkhorn selection again with ``eval_sinkhorn=True``
  (vmoe, deterministic since the noise is off in eval).
* no auxiliary loss (``balance_loss_weight = 0``; Megatron asserts it is 0): balance comes from the marginals.

What is confirmed and what is not:

* The Megatron rule (selection on ``sinkhorn(logits)`` under ``no_grad``, combine from ``sigmoid`` for ``k = 1``
  and ``softmax`` otherwise, plain top-k at inference, tol ``1e-4``, fp32) is from public code (confirmed);
  ``score_fn="sigmoid"`` gives its ``k = 1`` gate. Megatron iterates until the change of its column scaling is
  below ``tol`` (unbounded); our ``tol`` measures the relative column-marginal error instead, with a cap of
  ``num_iters`` iterations.
* The vmoe rule (``eps = 1``, a fixed 20 iterations, ``cost = -logits``, marginals 1 and ``S/E``, softmax combine,
  Sinkhorn also at eval) is from the authors' code (confirmed); our defaults ``epsilon=1.0, num_iters=20,
  tol=None`` follow it. vmoe differentiates the plan implicitly but only uses it for the top-k, so the
  ``no_grad`` here loses nothing.
* vmoe's noisy branch computes the plan from the noisy logits but the combine softmax from the **clean** logits
  (reference §5.3.2); we do the same (``noise_std > 0`` only; the default is no noise).
* What the S-BASE *paper* uses (iterations, temperature, gate, eval routing) is **unconfirmed** (reference §13).
* ``capacity_factor`` (token choice only) drops overflow with :func:`~smoe.routing.capacity.capacity_keep_mask`
  in position order; whether any of the papers combine Sinkhorn with capacity dropping is not confirmed.

The Sinkhorn Expert Choice router of the Routers-in-Vision-MoE study lives here as ``variant="expert_choice"``;
its sparsity-constrained sibling is :mod:`smoe.routing.sparsity_constrained`.

Causality: the training selection balances over the whole group, so the router couples tokens
(``couples_tokens = True``); in a causal model use ``group_mode="position"``.

Shape legend: ``T`` tokens in routing order, ``G`` groups of ``S`` tokens, ``E`` experts, ``K`` top-k.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from smoe.routing.base import RouterOutput, RoutingContext
from smoe.routing.capacity import compute_capacity, token_choice_keep_mask
from smoe.routing.expert_choice import expert_choice_plan
from smoe.routing.gated import GatedRouter
from smoe.routing.options import MIN_SCALE, choice, flag, integer, real
from smoe.routing.plan import SparsePlan, sparse_plan_from_topk
from smoe.routing.registry import register_router

__all__ = ["SinkhornRouter", "sinkhorn_plan", "sinkhorn_plan_reference", "check_sinkhorn_options"]


def _marginals(S: int, E: int, row_marginal: float, col_marginal: float | None) -> tuple[float, float]:
    if row_marginal <= 0:
        raise ValueError(f"row_marginal must be > 0, got {row_marginal!r}")
    col = row_marginal * S / E if col_marginal is None else col_marginal
    if col <= 0:
        raise ValueError(f"col_marginal must be > 0, got {col!r}")
    if not math.isclose(row_marginal * S, col * E, rel_tol=1e-6):
        raise ValueError(f"unbalanced marginals: S * row_marginal = {row_marginal * S} != E * col_marginal = {col * E}")
    return row_marginal, col


def check_sinkhorn_options(epsilon: float, num_iters: int, tol: float | None) -> None:
    """``ValueError`` naming a bad solver option: ``epsilon > 0``, ``num_iters >= 1``, ``tol`` ``None`` or ``> 0``."""
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters!r}")
    if tol is not None and tol <= 0:
        raise ValueError(f"tol must be None or > 0, got {tol!r}")


def sinkhorn_plan(
    scores_GSE: Tensor,
    *,
    row_marginal: float = 1.0,
    col_marginal: float | None = None,
    epsilon: float = 1.0,
    num_iters: int = 20,
    tol: float | None = None,
) -> Tensor:
    """Entropic OT plan ``diag(u) exp(scores / eps) diag(v)`` of every group, log domain, float32.

    Args:
        scores_GSE: ``(G, S, E)`` (or ``(S, E)``) gains, ``-cost`` (router logits, or probabilities for SSR).
        row_marginal: mass of every token (row sum), ``1``.
        col_marginal: mass of every expert (column sum); ``None`` for ``row_marginal * S / E``.
        epsilon: entropic regularisation ``eps > 0`` (vmoe: 1.0).
        num_iters: maximum number of (column, row) update pairs (vmoe: a fixed 20).
        tol: stop early once every column is within relative error ``tol`` of its marginal (all groups); ``None``
            runs exactly ``num_iters`` iterations (no host sync). The check costs one sync per iteration.

    Returns:
        ``(G, S, E)`` float32 plan; rows sum to ``row_marginal`` (exact up to rounding: the last update is a row
        update), columns to ``col_marginal`` (within ``tol`` when it stopped on the tolerance). Differentiable
        through the unrolled iterations; call it under ``torch.no_grad()`` when the plan only selects.
    """
    check_sinkhorn_options(epsilon, num_iters, tol)
    squeeze = scores_GSE.dim() == 2
    if squeeze:
        scores_GSE = scores_GSE.unsqueeze(0)
    G, S, E = scores_GSE.shape
    a, b = _marginals(S, E, row_marginal, col_marginal)
    log_a, log_b = math.log(a), math.log(b)
    with torch.autocast(device_type=scores_GSE.device.type, enabled=False):
        logK_GSE = scores_GSE.float() / epsilon
        # Shifts of the potentials (u, v) -> (u * c, v / c), and of a row of log K against its u, leave every
        # iterate's plan unchanged. Shift each row of log K to max 0 and start from u = exp(row max), i.e. from the
        # plain-domain u = 1 of the reference; re-centre v after each column update. Same plans, small numbers.
        max_GS = logK_GSE.detach().amax(dim=2)
        logK_GSE = logK_GSE - max_GS.unsqueeze(2)
        lu_GS = max_GS
        lv_GE = logK_GSE.new_zeros(G, E)
        for it in range(num_iters):
            lv_new_GE = log_b - torch.logsumexp(logK_GSE + lu_GS.unsqueeze(2), dim=1)
            # the current plan's columns sum to b * exp(lv - lv_new): stop before updating if close enough
            if tol is not None and it > 0 and float(torch.expm1(lv_GE - lv_new_GE).detach().abs().max()) < tol:
                break
            lv_GE = lv_new_GE - lv_new_GE.detach().amax(dim=1, keepdim=True)
            lu_GS = log_a - torch.logsumexp(logK_GSE + lv_GE.unsqueeze(1), dim=2)
        plan_GSE = torch.exp(lu_GS.unsqueeze(2) + logK_GSE + lv_GE.unsqueeze(1))
    return plan_GSE.squeeze(0) if squeeze else plan_GSE


def sinkhorn_plan_reference(
    scores_SE: Tensor,
    *,
    row_marginal: float = 1.0,
    col_marginal: float | None = None,
    epsilon: float = 1.0,
    num_iters: int = 20,
) -> Tensor:
    """Plain-domain Sinkhorn scaling of one group (the specification of :func:`sinkhorn_plan`), in float64.

    ``K = exp(scores / eps)``; repeat ``v = b / (K^T u)``, ``u = a / (K v)``; return ``diag(u) K diag(v)``.
    Overflows for large ``scores / eps``: tests only.
    """
    S, E = scores_SE.shape
    a, b = _marginals(S, E, row_marginal, col_marginal)
    K_SE = torch.exp(scores_SE.double() / epsilon)
    u_S = torch.ones(S, dtype=torch.float64, device=scores_SE.device)
    v_E = torch.ones(E, dtype=torch.float64, device=scores_SE.device)
    for _ in range(num_iters):
        v_E = b / (K_SE.t() @ u_S)
        u_S = a / (K_SE @ v_E)
    return u_S.unsqueeze(1) * K_SE * v_E.unsqueeze(0)


@register_router("sinkhorn")
class SinkhornRouter(GatedRouter):
    """Sinkhorn-balanced selection with raw-score combine weights (see module docstring).

    Args (beyond :class:`~smoe.routing.gated.GatedRouter`, whose balance loss defaults to off here):
        variant: ``"token_choice"`` (S-BASE / Megatron / vmoe Sinkhorn TC: top-k experts per token on the plan)
            or ``"expert_choice"`` (vmoe Sinkhorn EC: top-c tokens per expert on the plan).
        epsilon, num_iters, tol: solver options of :func:`sinkhorn_plan` (defaults: vmoe's 1.0, 20, ``None``;
            Megatron-like: ``num_iters=1000, tol=1e-4``).
        score_fn: combine weights ``"softmax"`` (default; vmoe, Megatron for ``k > 1``) or ``"sigmoid"``
            (Megatron's gate for ``k = 1``). Token choice only.
        renormalize: divide each token's kept weights by their sum (off in Megatron and vmoe). Token choice only.
        eval_sinkhorn: also select on the plan in evaluation (vmoe); default ``False``: plain top-k (Megatron).
        noise_std: gaussian noise ``noise_std / E`` on the logits of the *plan* in training (vmoe), default 0.
        capacity_multiple_of: round the capacity (expert choice: ``c``, then clamped to ``S``; token choice: the
            ``capacity_factor`` buffer) up to a multiple of this (:func:`~smoe.routing.capacity.compute_capacity`);
            default 1, vmoe's default is 4.
    """

    couples_tokens = True
    capacity_options = frozenset({"capacity_factor"})

    OPTIONS = {
        "variant": choice("token_choice", "expert_choice"),
        "epsilon": real(ge=MIN_SCALE),
        "num_iters": integer(ge=1),
        "tol": real(gt=0, none=True),
        "score_fn": choice("softmax", "sigmoid"),
        "renormalize": flag(),
        "eval_sinkhorn": flag(),
        "noise_std": real(ge=0),
        "capacity_multiple_of": integer(ge=1),
    }

    def __init__(
        self,
        *,
        variant: str = "token_choice",
        epsilon: float = 1.0,
        num_iters: int = 20,
        tol: float | None = None,
        score_fn: str = "softmax",
        renormalize: bool = False,
        eval_sinkhorn: bool = False,
        noise_std: float = 0.0,
        capacity_multiple_of: int = 1,
        balance_loss_weight: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(balance_loss_weight=balance_loss_weight, **kwargs)
        if variant not in ("token_choice", "expert_choice"):
            raise ValueError(f"variant must be 'token_choice' or 'expert_choice', got {variant!r}")
        if score_fn not in ("softmax", "sigmoid"):
            raise ValueError(f"score_fn must be 'softmax' or 'sigmoid', got {score_fn!r}")
        if variant == "expert_choice" and (score_fn != "softmax" or renormalize):
            raise ValueError(
                f"variant='expert_choice' combines with softmax gates; got score_fn={score_fn!r}, "
                f"renormalize={renormalize!r}"
            )
        check_sinkhorn_options(epsilon, num_iters, tol)
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        self.variant, self.score_fn, self.renormalize = variant, score_fn, renormalize
        self.epsilon, self.num_iters, self.tol = epsilon, num_iters, tol
        self.eval_sinkhorn, self.noise_std = eval_sinkhorn, noise_std
        self.capacity_multiple_of = capacity_multiple_of

    def balanced_plan(self, logits_GSE: Tensor) -> Tensor:
        """``(G, S, E)`` Sinkhorn plan of the logits, without gradient (selection only)."""
        with torch.no_grad():
            return sinkhorn_plan(logits_GSE, epsilon=self.epsilon, num_iters=self.num_iters, tol=self.tol)

    def experts_per_token(self, group_size: int | None = None) -> float:
        """``top_k``; the capacity factor (default ``top_k``) for ``variant="expert_choice"``."""
        if self.variant == "expert_choice" and self.capacity_factor is not None:
            return float(self.capacity_factor)
        return float(self.top_k)

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        S = ctx.group_size
        G = T // S
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)  # clean-logit combine weights, as vmoe
        if self.training or self.eval_sinkhorn:
            noisy_TE = logits_TE
            if self.training and self.noise_std > 0:
                noisy_TE = logits_TE + (self.noise_std / E) * torch.randn_like(logits_TE)
            select_TE = self.balanced_plan(noisy_TE.detach().view(G, S, E)).view(T, E)
        else:
            select_TE = probs_TE.detach()  # plain top-k / expert choice on the router probabilities
        if self.variant == "expert_choice":
            cf = self.capacity_factor if self.capacity_factor is not None else float(K)
            capacity = min(compute_capacity(S, E, cf, 1, multiple_of=self.capacity_multiple_of), S)
            chosen = expert_choice_plan(select_TE.view(G, S, E), capacity)
            plan = dataclasses.replace(chosen, weight_N=probs_TE[chosen.token_idx_N, chosen.expert_idx_N])
            expert_idx_GSK = None
        else:
            plan, expert_idx_GSK = self._token_choice(select_TE, logits_TE, probs_TE, G, S)
        losses, total = self.standard_losses(logits_TE.view(G, S, E), probs_TE.view(G, S, E), expert_idx_GSK)
        return RouterOutput(plan=plan, losses=losses, loss=total, probs_TE=probs_TE)

    def _token_choice(
        self, select_TE: Tensor, logits_TE: Tensor, probs_TE: Tensor, G: int, S: int
    ) -> tuple[SparsePlan, Tensor]:
        E, K = self.num_experts, self.top_k
        expert_idx_TK = select_TE.topk(K, dim=-1).indices
        gate_TE = probs_TE if self.score_fn == "softmax" else torch.sigmoid(logits_TE)
        weight_TK = gate_TE.gather(1, expert_idx_TK)
        if self.renormalize:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        keep_TK = token_choice_keep_mask(
            expert_idx_TK, S, E, self.capacity_factor, multiple_of=self.capacity_multiple_of
        )
        return sparse_plan_from_topk(expert_idx_TK, weight_TK, E, keep_TK), expert_idx_TK.view(G, S, K)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, variant={self.variant!r}, epsilon={self.epsilon}, num_iters={self.num_iters}, "
            f"tol={self.tol}, eval_sinkhorn={self.eval_sinkhorn}"
        )
