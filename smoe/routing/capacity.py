"""Expert capacity: how many assignments an expert accepts per routing group, and which ones it keeps.

Capacity formulas differ between libraries (reference §12.3); we follow vmoe's ``compute_capacity``:
``C = ceil(cf * S * K / E)`` (or ``round``), then rounded *up* to a multiple of ``multiple_of``. vmoe's default
``multiple_of`` is 4; ours is 1 so that small test groups get exactly the nominal capacity. Every router that
computes a capacity takes it as the option ``capacity_multiple_of``. Expert-choice routers then clamp ``c`` to the
group size ``S`` (an expert cannot take more tokens than the group has; vmoe's ``top_k`` would fail there), so the
clamped value need not be a multiple; token-choice capacities are not clamped (``C >= S`` simply drops nothing).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["compute_capacity", "capacity_keep_mask", "token_choice_keep_mask"]


def compute_capacity(
    group_size: int,
    num_experts: int,
    capacity_factor: float,
    top_k: int = 1,
    *,
    rounding: str = "ceil",
    multiple_of: int = 1,
) -> int:
    """Per-expert, per-group buffer size ``C`` (vmoe ``compute_capacity``).

    Args:
        group_size: ``S``, tokens per routing group.
        num_experts: ``E``.
        capacity_factor: ``cf > 0``; 1.0 means room for exactly the average load.
        top_k: ``K`` (1 for expert choice, whose ``c = S * cf / E``).
        rounding: ``"ceil"`` (vmoe default) or ``"round"``.
        multiple_of: round ``C`` up to a multiple of this.

    Returns:
        ``C >= 1``.
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    raw = capacity_factor * group_size * top_k / num_experts
    if rounding == "ceil":
        c = math.ceil(raw - 1e-9)
    elif rounding == "round":
        c = round(raw)
    else:
        raise ValueError(f"rounding must be 'ceil' or 'round', got {rounding!r}")
    c = max(c, 1)
    c += (-c) % multiple_of
    return c


def capacity_keep_mask(
    expert_idx_GSK: Tensor, capacity: int, num_experts: int, priority_GS: Tensor | None = None
) -> Tensor:
    """Which assignments fit in their expert's buffer (V-MoE ``_get_top_experts_per_item_common``, reference §3.1.3).

    Assignments are placed in this order: all top-1 choices before any top-2 choice (and so on); within one choice
    rank, by token position, or, with Batch Prioritized Routing, by descending ``priority_GS`` (the token's top-1
    gate). An assignment is kept if fewer than ``capacity`` assignments to the same expert come before it.

    Implementation: one stable sort by the key ``(expert, group, placement rank)``; an assignment's buffer slot is
    its index minus the start of its ``(expert, group)`` segment. This costs ``O(T K log T K)`` and no ``(T, E)``
    one-hot.

    Args:
        expert_idx_GSK: ``(G, S, K)`` chosen experts.
        capacity: ``C``, buffer rows per expert and group.
        num_experts: ``E``.
        priority_GS: ``(G, S)`` priority (higher is placed first), or ``None`` for position order.

    Returns:
        ``(G, S, K)`` bool mask, ``True`` where the assignment is kept.
    """
    G, S, K = expert_idx_GSK.shape
    device = expert_idx_GSK.device
    if priority_GS is None:
        position_GS = torch.arange(S, device=device).expand(G, S)
    else:
        # rank of each token in descending priority; ties keep position order (stable sort)
        order_GS = torch.argsort(-priority_GS, dim=1, stable=True)
        position_GS = torch.empty_like(order_GS)
        position_GS.scatter_(1, order_GS, torch.arange(S, device=device).expand(G, S))
    # placement rank inside a group: choice rank first, then token priority/position
    rank_GSK = torch.arange(K, device=device).view(1, 1, K) * S + position_GS.unsqueeze(-1)
    group_GSK = torch.arange(G, device=device).view(G, 1, 1).expand(G, S, K)
    segment = (expert_idx_GSK * G + group_GSK).reshape(-1)  # (expert, group) segment id
    key = segment * (S * K) + rank_GSK.reshape(-1)
    order = torch.argsort(key)
    seg_sorted = segment[order]
    counts = torch.bincount(seg_sorted, minlength=num_experts * G)
    starts = torch.cumsum(counts, 0) - counts
    slot_sorted = torch.arange(order.numel(), device=device) - starts[seg_sorted]
    slot = torch.empty_like(slot_sorted)
    slot[order] = slot_sorted
    return (slot < capacity).view(G, S, K)


def token_choice_keep_mask(
    expert_idx_TK: Tensor,
    group_size: int,
    num_experts: int,
    capacity_factor: float | None,
    priority_GS: Tensor | None = None,
    *,
    rounding: str = "ceil",
    multiple_of: int = 1,
) -> Tensor | None:
    """The capacity mask of top-k choices in routing-group order, or ``None`` when routing is dropless.

    :func:`compute_capacity` for ``K`` choices per token, then :func:`capacity_keep_mask` over the ``T // S``
    groups: the one step every token-choice-style router takes between selection and plan.

    Args:
        expert_idx_TK: ``(T, K)`` chosen experts, ``T`` a multiple of ``group_size``.
        group_size: ``S``.
        num_experts: ``E``.
        capacity_factor: ``None`` (dropless: returns ``None``) or ``cf > 0``.
        priority_GS: Batch Prioritized Routing priority, or ``None`` for position order.
        rounding / multiple_of: see :func:`compute_capacity`.

    Returns:
        ``(T, K)`` bool mask (``True`` = kept), or ``None``.
    """
    if capacity_factor is None:
        return None
    T, K = expert_idx_TK.shape
    S = group_size
    capacity = compute_capacity(S, num_experts, capacity_factor, K, rounding=rounding, multiple_of=multiple_of)
    return capacity_keep_mask(expert_idx_TK.view(T // S, S, K), capacity, num_experts, priority_GS).view(T, K)
