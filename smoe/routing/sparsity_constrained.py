"""Sparsity-constrained optimal-transport routing ("Routers in Vision Mixture of Experts: An Empirical Study", Liu,
Blondel, Riquelme, Puigcerver, TMLR 2024, arXiv 2401.15969; solver of "Sparsity-Constrained Optimal Transport",
Liu, Puigcerver, Blondel, ICLR 2023, arXiv 2209.15466), reference §5.3.2 items 4-5.

Per routing group, with similarities ``sim = softmax(logits)`` (``(S, E)``; the cost is ``-sim``), the plan solves
the quadratically regularised, sparsity-constrained transport problem::

    P = argmax_P <sim, P> - (gamma / 2) ||P||^2
        s.t. P >= 0,  P 1_E = 1_S,  P^T 1_S = (S / E) 1_E,  every column (expert) has <= nnz nonzeros

(``variant="expert_choice"``, vmoe ``KSparseProjectionTransportTopItemsPerExpertRouter``, ``nnz = c``) or every
*row* (token) has ``<= nnz = K`` nonzeros (``variant="token_choice"``, ``KSparseProjectionTransportTop
ExpertsPerItemRouter``). ``k_sparse=False`` drops the nonzero limit (``nnz`` = the full column, resp. row): the plain
quadratically regularised plan, i.e. the Euclidean projection of ``sim`` onto the transport polytope (jaxopt
``projection_transport``); with ``variant="expert_choice"`` this is vmoe's
``SparseProjectionTransportTopItemsPerExpertRouter``. Dispatch: every expert takes its top-``c`` tokens by plan
value (expert choice) or every token its top-``K`` experts by plan value (token choice, optional capacity);
combine: ``softmax(logits)`` gates at the dispatched positions. The plan is used for selection only (computed
under ``no_grad``); no auxiliary loss.

Semi-dual solver (Blondel, Seguy, Rolet, AISTATS 2018, eq. 10; jaxopt ``_regularized_transport_semi_dual``): write
the problem for the sparse side's vectors ``p_j`` (columns for expert choice), each with mass ``b_j``; with
potentials ``alpha`` on the other side (marginal ``a``),

    max_alpha  <alpha, a> - sum_j b_j max_Omega(alpha + sim_j),
    max_Omega(x) = max_{y in simplex, ||y||_0 <= nnz} <y, x> - (gamma b_j / 2) ||y||^2
    y_j*   = proj_{nnz-sparse simplex}((alpha + sim_j) / (gamma b_j)),   p_j = b_j y_j*,
    grad   = a - sum_j b_j y_j*                                          (Danskin)

so every sparse-side vector has exactly its marginal and at most ``nnz`` nonzeros, while the other marginal is
met only as far as the ascent has converged. The ascent is Adam (``lr = 1e-2``, at most 20 iterations, ``gamma =
1``: vmoe's settings), from ``alpha = 0``. The projection onto the k-sparse simplex keeps the ``k`` largest entries
and projects them onto the simplex by sorting (exact: Kyrillidis et al., ICML 2013),
:func:`projection_sparse_simplex`.

Stopping rule (``tol``, default ``1e-3``), as vmoe runs jaxopt (read at vmoe 942a78b, jaxopt 2de13bf): vmoe
builds ``jaxopt.OptaxSolver(maxiter=20, opt=optax.adam(1e-2))`` with the default ``tol=1e-3`` and maps the whole
solve over the groups with ``jax.vmap``
(``vmoe/projects/sparsity_constrained_ot/{ksparse,sparse}_projection_routing.py``), so every group runs its own
loop. jaxopt's ``IterativeSolver._run`` (``jaxopt/_src/base.py``) always takes the first step, then loops
``while iter_num < maxiter and error > tol``; each ``OptaxSolver.update`` (``jaxopt/_src/optax_wrapper.py``)
evaluates the gradient at the current potentials, applies the Adam update, and records ``error`` = the l2 norm of
*that* gradient, i.e. the gradient before the update it has just applied. So step ``t`` computes
``g_t = grad(alpha_{t-1})`` and ``alpha_t = alpha_{t-1} + adam(g_t)``, and the group stops after step ``t`` once
``||g_t||_2 <= tol`` (the norm over the group's own ``S`` token potentials for expert choice, ``E`` expert
potentials for token choice), returning ``alpha_t``: the last update is applied, its result is not checked. With
``jit=True`` and no implicit differentiation the loop is ``jaxopt/_src/loop.py``'s scan with a ``lax.cond`` per
step; under ``vmap`` that cond becomes a per-group select, so a stopped group keeps its potentials (and Adam
state) while the others go on. We do the same with a per-group mask and leave the loop when every group has
stopped (one host sync per step, only when ``tol > 0``). ``tol = 0`` switches the test off and runs exactly
``num_iters`` steps, the fixed-iteration solver of earlier versions (jaxopt with ``tol=0`` would still stop on an
exactly zero gradient). ``RouterOutput.stats["solver_steps"]`` is the most steps any group took in the call
(the loop length), ``"solver_steps_mean"`` the mean over groups.

What is confirmed and what is not:

* Confirmed from the authors' vmoe code (the files above) and jaxopt's ``projection.py``: ``sim =
  softmax(logits)``, ``gamma = 1``, Adam ``lr 1e-2`` / ``maxiter 20`` / ``tol 1e-3``, per-group solves,
  potentials initialised at zero, the scaling ``gamma * b_j`` of the max operator, marginals ``1`` and ``S/E``,
  ``nnz = c`` for expert choice (``compute_capacity`` with the dispatcher's ``capacity_multiple_of``, whose
  default there is 4; ours is 1) and ``nnz = K`` for token choice, top-c / top-k dispatch on the plan and softmax
  combine. vmoe's k-sparse max operator writes ``(gamma b / 2) <y, y - 1>`` for ``(gamma b / 2) ||y||^2``: a
  constant shift (``sum y = 1``) that changes neither the gradient nor the plan.
* Implemented here vs the authors' code: our own PyTorch Adam (optax defaults ``b1 0.9, b2 0.999, eps 1e-8``)
  and sparse-simplex projection instead of optax / ``jaxopt.projection_sparse_simplex``. Ties among zero plan
  entries (a column with fewer than ``c`` nonzeros) are broken by the similarity (ours; vmoe's ``top_k`` breaks
  them arbitrarily). vmoe adds no noise in these routers; ``noise_std`` (default 0) is ours.
* All of the empirical study's numbers and settings are **unconfirmed** (reference §5.3.3, §13).
* The *Sinkhorn* expert-choice router of the same study is ``sinkhorn`` with ``variant="expert_choice"``
  (:mod:`smoe.routing.sinkhorn`).

Causality: the plan couples every token of the group (``couples_tokens = True``): use ``group_mode="position"``
in a causal model.

Shape legend: ``T`` tokens in routing order, ``G`` groups of ``S`` tokens, ``E`` experts, ``K`` top-k, ``c``
tokens per expert.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from smoe.routing.base import RouterOutput, RoutingContext
from smoe.routing.capacity import compute_capacity, token_choice_keep_mask
from smoe.routing.expert_choice import expert_choice_plan
from smoe.routing.gated import GatedRouter
from smoe.routing.options import MIN_SCALE, choice, flag, integer, real
from smoe.routing.plan import sparse_plan_from_topk
from smoe.routing.registry import register_router

__all__ = [
    "SparsityConstrainedRouter",
    "projection_simplex",
    "projection_sparse_simplex",
    "sparse_semi_dual_plan",
    "sparse_semi_dual_solve",
    "semi_dual_objective",
]


def _projection_simplex_sorted(u: Tensor, z: Tensor | float) -> Tensor:
    """Projection onto ``{y >= 0, sum y = z}`` of vectors ``u`` already sorted descending along the last dim."""
    n = u.shape[-1]
    cssv = u.cumsum(dim=-1) - z
    ind = torch.arange(1, n + 1, device=u.device, dtype=u.dtype)
    rho = (u - cssv / ind > 0).sum(dim=-1, keepdim=True).clamp_min(1)  # the condition holds for a prefix
    theta = cssv.gather(-1, rho - 1) / rho.to(u.dtype)
    return (u - theta).clamp_min(0)


def projection_simplex(v: Tensor, z: float = 1.0, dim: int = -1) -> Tensor:
    """Euclidean projection onto the scaled simplex ``{y >= 0, sum y = z}`` along ``dim`` (sort-based, Duchi et al.
    ICML 2008)."""
    return projection_sparse_simplex(v, v.shape[dim], z, dim)


def projection_sparse_simplex(v: Tensor, k: int, z: float = 1.0, dim: int = -1) -> Tensor:
    """Euclidean projection onto ``{y >= 0, sum y = z, ||y||_0 <= k}`` along ``dim``.

    The projection keeps the ``k`` largest entries, projects them onto the simplex and zeros the rest (exact:
    Kyrillidis, Becker, Cevher, Koch, "Sparse projections onto the simplex", ICML 2013).

    Args:
        v: any shape.
        k: ``1 <= k``; clamped to the size of ``dim``.
        z: the simplex scale ``z > 0``.
        dim: the dimension to project along.

    Returns:
        A tensor of ``v``'s shape, nonnegative, summing to ``z`` along ``dim`` with at most ``k`` nonzeros.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    if z <= 0:
        raise ValueError(f"z must be > 0, got {z!r}")
    v_last = v.movedim(dim, -1)
    k = min(k, v_last.shape[-1])
    top_vals, top_idx = v_last.topk(k, dim=-1)  # sorted descending
    out = torch.zeros_like(v_last).scatter(-1, top_idx, _projection_simplex_sorted(top_vals, z))
    return out.movedim(-1, dim)


def _sparse_side(sim_GSE: Tensor, sparse: str) -> Tensor:
    """``(G, n, m)`` view where each of the ``m`` sparse-side vectors runs along dim 1."""
    if sparse == "columns":
        return sim_GSE
    if sparse == "rows":
        return sim_GSE.transpose(1, 2)
    raise ValueError(f"sparse must be 'columns' or 'rows', got {sparse!r}")


def semi_dual_objective(
    alpha_Gn: Tensor, sim_GSE: Tensor, nnz: int, *, sparse: str = "columns", gamma: float = 1.0
) -> Tensor:
    """Semi-dual objective per group, ``<alpha, a> - sum_j b_j max_Omega(alpha + sim_j)`` (module docstring).

    ``alpha_Gn`` lives on the dense side: tokens (``(G, S)``, marginal 1) for ``sparse="columns"``, experts
    (``(G, E)``, marginal ``S/E``) for ``sparse="rows"``. Returns ``(G,)``; used to test the solver's gradient.
    """
    X_Gnm = _sparse_side(sim_GSE.float(), sparse)
    G, n, m = X_Gnm.shape
    S, E = sim_GSE.shape[1:]
    a, b = (1.0, S / E) if sparse == "columns" else (S / E, 1.0)
    x_Gnm = alpha_Gn.unsqueeze(2) + X_Gnm
    with torch.no_grad():
        y_Gnm = projection_sparse_simplex(x_Gnm / (gamma * b), nnz, dim=1)
    max_omega_Gm = (y_Gnm * x_Gnm).sum(1) - 0.5 * gamma * b * (y_Gnm * y_Gnm).sum(1)
    return a * alpha_Gn.sum(1) - b * max_omega_Gm.sum(1)


def _check_solver_options(gamma: float, num_iters: int, tol: float = 0.0) -> None:
    """``ValueError`` for a regularisation ``gamma <= 0``, a negative iteration count or a negative tolerance."""
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0 (0: no early stop), got {tol!r}")


def sparse_semi_dual_solve(
    sim_GSE: Tensor,
    nnz: int,
    *,
    sparse: str = "columns",
    gamma: float = 1.0,
    num_iters: int = 20,
    tol: float = 1e-3,
    lr: float = 1e-2,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """Sparsity-constrained, quadratically regularised OT plan of every group by Adam on the semi-dual, and the
    number of Adam steps each group took.

    Each group runs its own ascent and stops as jaxopt's ``OptaxSolver`` does under vmoe's ``jax.vmap`` (module
    docstring; ``jaxopt/_src/base.py`` ``IterativeSolver._run``, ``jaxopt/_src/optax_wrapper.py``
    ``OptaxSolver.update``): step ``t`` takes ``g_t = grad(alpha_{t-1})``, applies ``alpha_t = alpha_{t-1} +
    adam(g_t)``, and the group stops after it when ``||g_t||_2 <= tol`` or ``t = num_iters``; the first step is
    always taken. The plan is built from the final ``alpha``.

    Args:
        sim_GSE: ``(G, S, E)`` similarities (``-cost``); the router passes ``softmax(logits)``.
        nnz: at most this many nonzeros per column (``sparse="columns"``: expert choice) or per row
            (``sparse="rows"``: token choice); clamped to the column (row) length, which makes it the plain
            quadratically regularised plan (jaxopt ``projection_transport``).
        sparse: which side is sparse, ``"columns"`` (experts) or ``"rows"`` (tokens).
        gamma: L2 regularisation strength (1.0 in vmoe).
        num_iters: at most this many Adam ascent steps (``maxiter = 20`` in vmoe); 0 returns the plan at
            ``alpha = 0``.
        tol: a group stops once the l2 norm of its semi-dual gradient, taken before the step's update, is
            ``<= tol`` (jaxopt's default ``1e-3``, which vmoe keeps); ``0`` never stops early (exactly
            ``num_iters`` steps).
        lr, betas, eps: Adam hyper-parameters (``lr = 1e-2`` in vmoe; optax defaults otherwise).

    Returns:
        ``(plan_GSE, steps_G)``: the ``(G, S, E)`` float32 plan, whose sparse-side vectors sum exactly to their
        marginal (``S/E`` per column, resp. 1 per row) with ``<= nnz`` nonzeros, the other marginal holding as far
        as the ascent converged; and the ``(G,)`` int64 count of Adam steps each group took. Not differentiable
        (selection only): runs under ``no_grad``.
    """
    if nnz < 1:
        raise ValueError(f"nnz must be >= 1, got {nnz!r}")
    _check_solver_options(gamma, num_iters, tol)
    G, S, E = sim_GSE.shape
    a, b = (1.0, S / E) if sparse == "columns" else (S / E, 1.0)
    b1, b2 = betas
    with torch.no_grad(), torch.autocast(device_type=sim_GSE.device.type, enabled=False):
        X_Gnm = _sparse_side(sim_GSE.float(), sparse)
        alpha_Gn = X_Gnm.new_zeros(X_Gnm.shape[:2])
        m1_Gn, m2_Gn = torch.zeros_like(alpha_Gn), torch.zeros_like(alpha_Gn)
        active_G1 = torch.ones(G, 1, dtype=torch.bool, device=sim_GSE.device)  # groups still iterating
        steps_G = torch.zeros(G, dtype=torch.long, device=sim_GSE.device)
        for t in range(1, num_iters + 1):
            y_Gnm = projection_sparse_simplex((alpha_Gn.unsqueeze(2) + X_Gnm) / (gamma * b), nnz, dim=1)
            grad_Gn = a - b * y_Gnm.sum(2)  # ascent direction of the semi-dual at alpha_{t-1} (Danskin)
            # Adam; a stopped group keeps its potentials and moments (all its entries are left as they were)
            m1_Gn = torch.where(active_G1, b1 * m1_Gn + (1 - b1) * grad_Gn, m1_Gn)
            m2_Gn = torch.where(active_G1, b2 * m2_Gn + (1 - b2) * grad_Gn * grad_Gn, m2_Gn)
            step_Gn = (m1_Gn / (1 - b1**t)) / ((m2_Gn / (1 - b2**t)).sqrt() + eps)
            alpha_Gn = torch.where(active_G1, alpha_Gn + lr * step_Gn, alpha_Gn)
            steps_G += active_G1.squeeze(1)
            if tol > 0:
                # jaxopt's error: the norm of the gradient this step used, i.e. before its update
                active_G1 = active_G1 & (torch.linalg.vector_norm(grad_Gn, dim=1, keepdim=True) > tol)
                if t < num_iters and not bool(active_G1.any()):
                    break
        plan_Gnm = b * projection_sparse_simplex((alpha_Gn.unsqueeze(2) + X_Gnm) / (gamma * b), nnz, dim=1)
    return (plan_Gnm if sparse == "columns" else plan_Gnm.transpose(1, 2)), steps_G


def sparse_semi_dual_plan(sim_GSE: Tensor, nnz: int, **solver_options) -> Tensor:
    """The ``(G, S, E)`` plan of :func:`sparse_semi_dual_solve` (same arguments), without the step counts."""
    return sparse_semi_dual_solve(sim_GSE, nnz, **solver_options)[0]


def _selection_scores(plan_GSE: Tensor, sim_GSE: Tensor) -> Tensor:
    """Plan values where positive; below them, the similarity minus one (breaks ties among zero plan entries)."""
    return torch.where(plan_GSE > 0, plan_GSE, sim_GSE - 1.0)


@register_router("sparsity_constrained")
class SparsityConstrainedRouter(GatedRouter):
    """k-sparse (or plain) quadratically regularised OT routing, expert- or token-choice (see module docstring).

    Args (beyond :class:`~smoe.routing.gated.GatedRouter`, whose balance loss defaults to off here):
        variant: ``"expert_choice"`` (default; the study's new router: ``nnz = c = ceil(cf * S / E)`` nonzeros per
            expert, ``cf`` defaulting to ``top_k``, rounded up to a multiple of ``capacity_multiple_of`` and
            clamped to ``S``) or ``"token_choice"`` (``nnz = K`` nonzeros per token; the optional
            ``capacity_factor`` drops overflow in position order).
        k_sparse: ``True`` (default): the ``nnz`` limit above. ``False``: no limit, the plain quadratically
            regularised plan (vmoe ``SparseProjectionTransportTopItemsPerExpertRouter`` for expert choice; the
            token-choice form has no vmoe counterpart). Dispatch is the same top-c / top-k on the plan.
        gamma: L2 regularisation (1.0).
        num_iters: at most this many Adam steps on the semi-dual (20, vmoe ``maxiter``).
        tol: per-group early stop once the l2 norm of the semi-dual gradient is ``<= tol`` (1e-3, jaxopt's
            ``OptaxSolver`` default that vmoe keeps; 0: always ``num_iters`` steps). See the module docstring for
            the exact rule.
        lr: Adam learning rate (1e-2).
        noise_std: gaussian noise ``noise_std / E`` on the plan's logits in training, default 0 (not in vmoe).
        capacity_multiple_of: round the expert-choice capacity ``c`` (and so ``nnz``), or the token-choice
            capacity, up to a multiple of this (:func:`~smoe.routing.capacity.compute_capacity`); default 1,
            vmoe's default is 4.

    ``RouterOutput.stats``: ``plan_nnz_per_expert_max``, ``plan_nnz_per_token_max``, ``solver_steps`` (the most
    Adam steps a group took) and ``solver_steps_mean``. The plan selects in evaluation as well (vmoe;
    deterministic since noise is off in eval).
    """

    couples_tokens = True
    capacity_options = frozenset({"capacity_factor"})

    OPTIONS = {
        "variant": choice("expert_choice", "token_choice"),
        "k_sparse": flag(),
        "gamma": real(ge=MIN_SCALE),
        "num_iters": integer(ge=1),
        "tol": real(ge=0),
        "lr": real(gt=0),
        "noise_std": real(ge=0),
        "capacity_multiple_of": integer(ge=1),
    }

    def __init__(
        self,
        *,
        variant: str = "expert_choice",
        k_sparse: bool = True,
        gamma: float = 1.0,
        num_iters: int = 20,
        tol: float = 1e-3,
        lr: float = 1e-2,
        noise_std: float = 0.0,
        capacity_multiple_of: int = 1,
        balance_loss_weight: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(balance_loss_weight=balance_loss_weight, **kwargs)
        if variant not in ("expert_choice", "token_choice"):
            raise ValueError(f"variant must be 'expert_choice' or 'token_choice', got {variant!r}")
        _check_solver_options(gamma, num_iters, tol)
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        self.variant, self.k_sparse = variant, k_sparse
        self.gamma, self.num_iters, self.tol, self.lr, self.noise_std = gamma, num_iters, tol, lr, noise_std
        self.capacity_multiple_of = capacity_multiple_of

    def capacity(self, group_size: int) -> int:
        """Expert choice: tokens per expert and group, ``c = ceil(cf * S / E)`` (``cf = top_k`` when unset) rounded
        up to a multiple of ``capacity_multiple_of``, then clamped to ``S`` (an expert cannot take more tokens
        than the group has; the clamped value need not be a multiple)."""
        cf = self.capacity_factor if self.capacity_factor is not None else float(self.top_k)
        c = compute_capacity(group_size, self.num_experts, cf, 1, multiple_of=self.capacity_multiple_of)
        return min(c, group_size)

    def experts_per_token(self, group_size: int | None = None) -> float:
        """``top_k``; the capacity factor (default ``top_k``) for ``variant="expert_choice"``."""
        if self.variant == "expert_choice" and self.capacity_factor is not None:
            return float(self.capacity_factor)
        return float(self.top_k)

    def _solve(self, sim_GSE: Tensor, nnz: int, sparse: str) -> tuple[Tensor, Tensor]:
        if not self.k_sparse:
            nnz = sim_GSE.shape[1] if sparse == "columns" else sim_GSE.shape[2]
        return sparse_semi_dual_solve(
            sim_GSE, nnz, sparse=sparse, gamma=self.gamma, num_iters=self.num_iters, tol=self.tol, lr=self.lr
        )

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        S = ctx.group_size
        G = T // S
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        sim_TE = probs_TE.detach()
        if self.training and self.noise_std > 0:
            sim_TE = (logits_TE.detach() + (self.noise_std / E) * torch.randn_like(logits_TE)).softmax(dim=-1)
        sim_GSE = sim_TE.view(G, S, E)
        expert_idx_GSK = None
        if self.variant == "expert_choice":
            c = self.capacity(S)
            plan_GSE, steps_G = self._solve(sim_GSE, c, "columns")
            chosen = expert_choice_plan(_selection_scores(plan_GSE, sim_GSE), c)
            plan = dataclasses.replace(chosen, weight_N=probs_TE[chosen.token_idx_N, chosen.expert_idx_N])
        else:
            plan_GSE, steps_G = self._solve(sim_GSE, K, "rows")
            expert_idx_TK = _selection_scores(plan_GSE, sim_GSE).view(T, E).topk(K, dim=-1).indices
            keep_TK = token_choice_keep_mask(
                expert_idx_TK, S, E, self.capacity_factor, multiple_of=self.capacity_multiple_of
            )
            plan = sparse_plan_from_topk(expert_idx_TK, probs_TE.gather(1, expert_idx_TK), E, keep_TK)
            expert_idx_GSK = expert_idx_TK.view(G, S, K)
        losses, total = self.standard_losses(logits_TE.view(G, S, E), probs_TE.view(G, S, E), expert_idx_GSK)
        support_GSE = plan_GSE > 0
        stats = {
            "plan_nnz_per_expert_max": support_GSE.sum(1).max(),
            "plan_nnz_per_token_max": support_GSE.sum(2).max(),
            "solver_steps": steps_G.max(),
            "solver_steps_mean": steps_G.float().mean(),
        }
        return RouterOutput(plan=plan, losses=losses, loss=total, probs_TE=probs_TE, stats=stats)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, variant={self.variant!r}, k_sparse={self.k_sparse}, gamma={self.gamma}, "
            f"num_iters={self.num_iters}, tol={self.tol}, lr={self.lr}, "
            f"capacity_multiple_of={self.capacity_multiple_of}"
        )
