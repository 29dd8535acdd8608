"""Hash routing (Roller, Sukhbaatar, Szlam, Weston, "Hash Layers For Large Sparse Models", NeurIPS 2021).

A token's experts are a fixed function of its *input token id*, not of its hidden state: no router parameters, no
balancing loss, no routing fluctuation, and nothing to learn. Roller et al. compare several hash functions; two are
offered here:

* the default: a seeded integer hash. Expert ``e`` scores token id ``v`` with ``h_e(v) = mix((a_e * v + b_e) mod P)``
  (``P = 2^31 - 1``, ``a_e, b_e`` drawn once from ``seed``; ``mix`` = two rounds of xor-shift and multiplication
  modulo ``P``, which break the linearity of the first step so that *consecutive* ids spread evenly), and the token
  goes to the ``K`` experts with the highest scores: the paper's "Random Hash" without a vocabulary-sized table.
* a lookup table ``(V, K)`` set with :meth:`HashRouter.set_table`, e.g. Roller et al.'s "Balanced" assignment
  (their best fixed hash), built from token frequencies by :func:`balanced_hash_table`.

Combine weights are ``1/K`` (``K = 1``: the expert output itself, as in the paper's hash layer). The token ids come
from ``MoE.forward(token_ids=...)`` in routing order (``ctx.token_ids_T``); without them the router raises
``ValueError``. Routing depends only on each token's own id, so it never couples tokens and is causal-safe.
Not reproduced: MultiHash (several hashes over split hidden dimensions) and the learned-hash variants.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smoe.routing.base import Router, RouterOutput, RoutingContext
from smoe.routing.options import integer
from smoe.routing.plan import sparse_plan_from_topk
from smoe.routing.registry import register_router

__all__ = ["HashRouter", "hash_experts", "balanced_hash_table"]

_PRIME = 2**31 - 1
_MIX = 0x45D9F3B  # a well-known 32-bit integer-hash multiplier


def hash_experts(token_ids_T: Tensor, a_E: Tensor, b_E: Tensor, top_k: int) -> Tensor:
    """``(T, K)`` experts of each token id: the top-K of the hashed scores ``h_e(v)`` (module docstring).

    Args:
        token_ids_T: ``(T,)`` non-negative int64 token ids.
        a_E, b_E: ``(E,)`` int64 hash coefficients in ``[1, P)`` and ``[0, P)``.
        top_k: ``K``.
    """
    v_T1 = (token_ids_T % _PRIME).unsqueeze(1)
    # every value stays below 2^31, so every product stays below 2^62: no int64 overflow
    h_TE = (v_T1 * a_E + b_E) % _PRIME
    for _ in range(2):
        h_TE = h_TE ^ (h_TE >> 16)
        h_TE = (h_TE * _MIX) % _PRIME
    h_TE = h_TE ^ (h_TE >> 16)
    return h_TE.topk(top_k, dim=-1).indices


def balanced_hash_table(token_counts_V: Tensor, num_experts: int) -> Tensor:
    """Roller et al.'s "Balanced" assignment: most frequent ids first, each to the currently least-loaded expert.

    Args:
        token_counts_V: ``(V,)`` frequency of every token id in the training data.
        num_experts: ``E``.

    Returns:
        ``(V, 1)`` int64 table for :meth:`HashRouter.set_table` (top-1).
    """
    counts = token_counts_V.double().tolist()
    load = [0.0] * num_experts
    table = [0] * len(counts)
    for v in sorted(range(len(counts)), key=lambda i: -counts[i]):
        e = min(range(num_experts), key=load.__getitem__)
        table[v] = e
        load[e] += counts[v]
    return torch.tensor(table, dtype=torch.long).unsqueeze(1)


@register_router("hash")
class HashRouter(Router):
    """Fixed token-id -> expert routing (module docstring).

    Args:
        dim, num_experts, top_k: the common router arguments (``dim`` is unused).
        capacity_factor: must be ``None`` (hash routing is dropless here).
        seed: seed of the universal hash coefficients.
    """

    couples_tokens = False
    differentiable = False
    needs_token_ids = True

    OPTIONS = {"seed": integer(ge=0)}

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float | None = None,
        seed: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, top_k=top_k)
        if capacity_factor is not None:
            raise ValueError(f"hash routing is dropless; capacity_factor must be None, got {capacity_factor!r}")
        g = torch.Generator().manual_seed(seed)
        # persistent: the hash is part of the model (a checkpoint must route exactly as it was trained)
        self.register_buffer("hash_a_E", torch.randint(1, _PRIME, (num_experts,), generator=g).to(device))
        self.register_buffer("hash_b_E", torch.randint(0, _PRIME, (num_experts,), generator=g).to(device))
        self.register_buffer("table_VK", None)

    def set_table(self, table_VK: Tensor) -> None:
        """Route by a lookup table ``(V, K)`` of experts per token id instead of the universal hash."""
        if table_VK.dim() != 2 or table_VK.shape[1] != self.top_k:
            raise ValueError(f"table must have shape (V, top_k={self.top_k}), got {tuple(table_VK.shape)}")
        if int(table_VK.min()) < 0 or int(table_VK.max()) >= self.num_experts:
            raise ValueError(f"table entries must be expert indices in [0, {self.num_experts})")
        self.table_VK = table_VK.to(device=self.hash_a_E.device, dtype=torch.long)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint routed by a table restores it even into a router built without one
        table = state_dict.get(prefix + "table_VK")
        if table is not None and self.table_VK is None:
            self.table_VK = torch.empty_like(table, device=self.hash_a_E.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def experts_for(self, token_ids_T: Tensor) -> Tensor:
        """``(T, K)`` experts of each token id."""
        if token_ids_T.dtype not in (torch.int32, torch.int64) or (token_ids_T.numel() and int(token_ids_T.min()) < 0):
            raise ValueError("hash routing needs non-negative integer token ids")
        ids_T = token_ids_T.long()
        if self.table_VK is None:
            return hash_experts(ids_T, self.hash_a_E, self.hash_b_E, self.top_k)
        if int(ids_T.max()) >= self.table_VK.shape[0]:
            raise ValueError(f"token id {int(ids_T.max())} is outside the hash table of {self.table_VK.shape[0]} ids")
        return self.table_VK[ids_T]

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        if ctx.token_ids_T is None:
            raise ValueError("router 'hash' needs the input token ids: call MoE.forward(x, token_ids=...)")
        T, K = x_TD.shape[0], self.top_k
        if ctx.token_ids_T.shape != (T,):
            raise ValueError(f"token_ids hold {tuple(ctx.token_ids_T.shape)} ids for {T} tokens")
        expert_idx_TK = self.experts_for(ctx.token_ids_T.to(x_TD.device))
        weight_TK = torch.full((T, K), 1.0 / K, device=x_TD.device)
        plan = sparse_plan_from_topk(expert_idx_TK, weight_TK, self.num_experts)
        zero = x_TD.new_zeros((), dtype=torch.float32)
        return RouterOutput(plan=plan, losses={}, loss=zero)
