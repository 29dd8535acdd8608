"""Sparsity-constrained optimal-transport routing ("Routers in Vision Mixture of Experts: An Empirical Study", Liu,
Blondel, Riquelme, Puigcerver, TMLR 2024, arXiv 2401.15969; solver of "Sparsity-Constrained Optimal Transport",
Liu, Puigcerver, Blondel, ICLR 2023, arXiv 2209.15466), reference §5.3.2 items 4-5.

Per routing group, with similarities ``sim = softmax(logits)`` (``(S, E)``; the cost is ``-sim``), the plan solves
the quadratically regularised, sparsity-constrained transport problem::

    P = argmax_P <sim, P> - (gamma / 2) ||P||^2
        s.t. P >= 0,  P 1_E = 1_S,  P^T 1_S = (S / E) 1_E,  every column (expert) has <= nnz nonzeros

(``variant="expert_choice"``, vmoe ``KSparseProjectionTransportTopItemsPerExpertRouter``, ``nnz = c``) or every
*row* (token) has ``<= nnz = K`` nonzeros (``variant="token_choice"``, ``KSparseProjectionTransportTop
ExpertsPerItemRouter``). Dispatch: every expert takes its top-``c`` tokens by plan value (expert choice) or every
token its top-``K`` experts by plan value (token choice, optional capacity); combine: ``softmax(logits)`` gates at
the dispatched positions. The plan is used for selection only (computed under ``no_grad``); no auxiliary loss.

Semi-dual solver (Blondel, Seguy, Rolet, AISTATS 2018, §3; the same form as POT ``ot.smooth``): write the
problem for the sparse side's vectors ``p_j`` (columns for expert choice), each with mass ``b_j``; with potentials
``alpha`` on the other side (marginal ``a``),

    max_alpha  <alpha, a> - sum_j b_j max_Omega(alpha + sim_j),
    max_Omega(x) = max_{y in simplex, ||y||_0 <= nnz} <y, x> - (gamma b_j / 2) ||y||^2
    y_j*   = proj_{nnz-sparse simplex}((alpha + sim_j) / (gamma b_j)),   p_j = b_j y_j*,
    grad   = a - sum_j b_j y_j*                                          (Danskin)

so every sparse-side vector has exactly its marginal and at most ``nnz`` nonzeros, while the other marginal is
met only as far as the ascent has converged. The ascent is Adam (``lr = 1e-2``, 20 iterations, ``gamma = 1``:
vmoe's settings), from ``alpha = 0``. The projection onto the k-sparse simplex keeps the ``k`` largest entries and
projects them onto the simplex by sorting (exact: Kyrillidis et al., ICML 2013), :func:`projection_sparse_simplex`.

What is confirmed and what is not:

* ``sim = softmax(logits)``, ``gamma = 1``, Adam ``lr 1e-2`` / ``maxiter 20``, marginals ``1`` and ``S/E``,
  ``nnz = c`` for expert choice and ``nnz = K`` for token choice, top-c / top-k dispatch on the plan and softmax
  combine are from the authors' vmoe code as summarised in the reference (confirmed at that level).
* Implemented here vs the authors' code: our own PyTorch Adam (optax defaults ``b1 0.9, b2 0.999, eps 1e-8``)
  and sparse-simplex projection instead of optax / ``jaxopt.projection_sparse_simplex``; the zero initialisation
  of the potentials and the exact semi-dual scaling (``gamma * b_j``, the POT/Blondel form) are **our reading**,
  not checked against the vmoe file. Ties among zero plan entries (a column with fewer than ``c`` nonzeros) are
  broken by the similarity (ours; vmoe's ``top_k`` breaks them arbitrarily).
* The plain quadratically-regularised EC router (``SparseProjectionTransportTopItemsPerExpertRouter``, no ``k``)
  is not implemented; ``nnz`` can be raised to ``S`` to approximate it.
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
from smoe.routing.options import MIN_SCALE, choice, integer, real
from smoe.routing.plan import sparse_plan_from_topk
from smoe.routing.registry import register_router

__all__ = [
    "SparsityConstrainedRouter",
    "projection_simplex",
    "projection_sparse_simplex",
    "sparse_semi_dual_plan",
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


def _check_solver_options(gamma: float, num_iters: int) -> None:
    """``ValueError`` for a regularisation ``gamma <= 0`` or a negative iteration count (solver and router alike)."""
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters!r}")


def sparse_semi_dual_plan(
    sim_GSE: Tensor,
    nnz: int,
    *,
    sparse: str = "columns",
    gamma: float = 1.0,
    num_iters: int = 20,
    lr: float = 1e-2,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Tensor:
    """Sparsity-constrained, quadratically regularised OT plan of every group by Adam on the semi-dual.

    Args:
        sim_GSE: ``(G, S, E)`` similarities (``-cost``); the router passes ``softmax(logits)``.
        nnz: at most this many nonzeros per column (``sparse="columns"``: expert choice) or per row
            (``sparse="rows"``: token choice).
        sparse: which side is sparse, ``"columns"`` (experts) or ``"rows"`` (tokens).
        gamma: L2 regularisation strength (1.0 in vmoe).
        num_iters: Adam ascent steps (20 in vmoe); 0 returns the plan at ``alpha = 0``.
        lr, betas, eps: Adam hyper-parameters (``lr = 1e-2`` in vmoe; optax defaults otherwise).

    Returns:
        ``(G, S, E)`` float32 plan: the sparse side's vectors sum exactly to their marginal (``S/E`` per column,
        resp. 1 per row) with ``<= nnz`` nonzeros; the other marginal holds as far as the ascent converged.
        Not differentiable (selection only): runs under ``no_grad``.
    """
    if nnz < 1:
        raise ValueError(f"nnz must be >= 1, got {nnz!r}")
    _check_solver_options(gamma, num_iters)
    G, S, E = sim_GSE.shape
    a, b = (1.0, S / E) if sparse == "columns" else (S / E, 1.0)
    b1, b2 = betas
    with torch.no_grad(), torch.autocast(device_type=sim_GSE.device.type, enabled=False):
        X_Gnm = _sparse_side(sim_GSE.float(), sparse)
        alpha_Gn = X_Gnm.new_zeros(X_Gnm.shape[:2])
        m1_Gn, m2_Gn = torch.zeros_like(alpha_Gn), torch.zeros_like(alpha_Gn)
        for t in range(1, num_iters + 1):
            y_Gnm = projection_sparse_simplex((alpha_Gn.unsqueeze(2) + X_Gnm) / (gamma * b), nnz, dim=1)
            grad_Gn = a - b * y_Gnm.sum(2)  # ascent direction of the semi-dual (Danskin)
            m1_Gn.mul_(b1).add_(grad_Gn, alpha=1 - b1)
            m2_Gn.mul_(b2).addcmul_(grad_Gn, grad_Gn, value=1 - b2)
            step_Gn = (m1_Gn / (1 - b1**t)) / ((m2_Gn / (1 - b2**t)).sqrt() + eps)
            alpha_Gn.add_(step_Gn, alpha=lr)
        plan_Gnm = b * projection_sparse_simplex((alpha_Gn.unsqueeze(2) + X_Gnm) / (gamma * b), nnz, dim=1)
    return plan_Gnm if sparse == "columns" else plan_Gnm.transpose(1, 2)


def _selection_scores(plan_GSE: Tensor, sim_GSE: Tensor) -> Tensor:
    """Plan values where positive; below them, the similarity minus one (breaks ties among zero plan entries)."""
    return torch.where(plan_GSE > 0, plan_GSE, sim_GSE - 1.0)


@register_router("sparsity_constrained")
class SparsityConstrainedRouter(GatedRouter):
    """k-sparse quadratically regularised OT routing, expert- or token-choice (see module docstring).

    Args (beyond :class:`~smoe.routing.gated.GatedRouter`, whose balance loss defaults to off here):
        variant: ``"expert_choice"`` (default; the study's new router: ``nnz = c = ceil(cf * S / E)`` nonzeros per
            expert, ``cf`` defaulting to ``top_k``) or ``"token_choice"`` (``nnz = K`` nonzeros per token; the
            optional ``capacity_factor`` drops overflow in position order).
        gamma: L2 regularisation (1.0).
        num_iters: Adam steps on the semi-dual (20).
        lr: Adam learning rate (1e-2).
        noise_std: gaussian noise ``noise_std / E`` on the plan's logits in training (vmoe-style), default 0.

    The plan selects in evaluation as well (vmoe; deterministic since noise is off in eval).
    """

    couples_tokens = True
    capacity_options = frozenset({"capacity_factor"})

    OPTIONS = {
        "variant": choice("expert_choice", "token_choice"),
        "gamma": real(ge=MIN_SCALE),
        "num_iters": integer(ge=1),
        "lr": real(gt=0),
        "noise_std": real(ge=0),
    }

    def __init__(
        self,
        *,
        variant: str = "expert_choice",
        gamma: float = 1.0,
        num_iters: int = 20,
        lr: float = 1e-2,
        noise_std: float = 0.0,
        balance_loss_weight: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(balance_loss_weight=balance_loss_weight, **kwargs)
        if variant not in ("expert_choice", "token_choice"):
            raise ValueError(f"variant must be 'expert_choice' or 'token_choice', got {variant!r}")
        _check_solver_options(gamma, num_iters)
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        self.variant, self.gamma, self.num_iters, self.lr, self.noise_std = variant, gamma, num_iters, lr, noise_std

    def capacity(self, group_size: int) -> int:
        """Expert choice: tokens per expert and group, ``c = ceil(cf * S / E)`` (``cf = top_k`` when unset)."""
        cf = self.capacity_factor if self.capacity_factor is not None else float(self.top_k)
        return min(compute_capacity(group_size, self.num_experts, cf, 1), group_size)

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
        probs_TE = logits_TE.softmax(dim=-1)
        sim_TE = probs_TE.detach()
        if self.training and self.noise_std > 0:
            sim_TE = (logits_TE.detach() + (self.noise_std / E) * torch.randn_like(logits_TE)).softmax(dim=-1)
        sim_GSE = sim_TE.view(G, S, E)
        expert_idx_GSK = None
        if self.variant == "expert_choice":
            c = self.capacity(S)
            plan_GSE = sparse_semi_dual_plan(
                sim_GSE, c, sparse="columns", gamma=self.gamma, num_iters=self.num_iters, lr=self.lr
            )
            chosen = expert_choice_plan(_selection_scores(plan_GSE, sim_GSE), c)
            plan = dataclasses.replace(chosen, weight_N=probs_TE[chosen.token_idx_N, chosen.expert_idx_N])
        else:
            plan_GSE = sparse_semi_dual_plan(
                sim_GSE, K, sparse="rows", gamma=self.gamma, num_iters=self.num_iters, lr=self.lr
            )
            expert_idx_TK = _selection_scores(plan_GSE, sim_GSE).view(T, E).topk(K, dim=-1).indices
            keep_TK = token_choice_keep_mask(expert_idx_TK, S, E, self.capacity_factor)
            plan = sparse_plan_from_topk(expert_idx_TK, probs_TE.gather(1, expert_idx_TK), E, keep_TK)
            expert_idx_GSK = expert_idx_TK.view(G, S, K)
        losses, total = self.standard_losses(logits_TE.view(G, S, E), probs_TE.view(G, S, E), expert_idx_GSK)
        support_GSE = plan_GSE > 0
        stats = {
            "plan_nnz_per_expert_max": support_GSE.sum(1).max(),
            "plan_nnz_per_token_max": support_GSE.sum(2).max(),
        }
        return RouterOutput(plan=plan, losses=losses, loss=total, probs_TE=probs_TE, stats=stats)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, variant={self.variant!r}, gamma={self.gamma}, num_iters={self.num_iters}, "
            f"lr={self.lr}"
        )
