"""Routing diagnostics per MoE layer, computed from the ``MoEAux.stats`` every MoE layer returns.

For each layer, over any number of forward calls (e.g. a whole evaluation):

* ``load_cv``: coefficient of variation of the tokens each expert received, ``std(n_E) / mean(n_E)`` with the
  population std (0 = perfectly balanced; ``sqrt(E-1)`` = every token on one expert). Counts are summed over the
  calls before the ratio is taken, so it measures the load of the whole evaluation, not an average of per-batch CVs.
* ``max_load``: ``max(n_E) / mean(n_E)``, the factor by which the busiest expert exceeds a fair share (what sets
  the step time of an expert-parallel layer).
* ``dead_experts``: experts that received no token at all.
* ``drop_rate``: share of the requested (token, expert) assignments dropped by capacity, token-weighted mean.
* ``unrouted``: share of tokens that reached no expert (they pass through the residual only).
* ``entropy``: mean per-token entropy of the router probabilities, nats (``ln E`` = uniform, 0 = one-hot).
* ``load``: the per-expert token shares ``n_E / sum(n_E)`` (for the expert-load heatmaps).

Nothing here reads module internals: only the statistics the layer returns (peer request: observability of
per-expert load, dead experts and entropy, reference peer_libraries.md §4 item 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["load_summary", "RoutingStatsAccumulator", "summarize_layers"]


def load_summary(tokens_per_expert_E: Tensor) -> dict[str, float]:
    """``load_cv``, ``max_load`` and ``dead_experts`` of one count vector.

    Example: counts ``[3, 1, 0, 0]``: mean 1, population std ``sqrt((4 + 0 + 1 + 1) / 4) = sqrt(1.5) = 1.2247``,
    so ``load_cv = 1.2247``, ``max_load = 3``, ``dead_experts = 2``.
    """
    n_E = tokens_per_expert_E.detach().double().cpu()
    mean = n_E.mean().item()
    if mean <= 0:
        return {"load_cv": 0.0, "max_load": 0.0, "dead_experts": float(n_E.numel())}
    std = n_E.std(correction=0).item()
    return {"load_cv": std / mean, "max_load": n_E.max().item() / mean, "dead_experts": float((n_E == 0).sum())}


class RoutingStatsAccumulator:
    """Sums the routing statistics of every MoE layer over many forward calls.

    Usage::

        acc = RoutingStatsAccumulator()
        for batch in batches:
            out = model(batch)
            acc.add(out.moe_aux)
        per_layer = acc.summary()
    """

    def __init__(self) -> None:
        self._counts: list[Tensor] = []
        self._sums: list[dict[str, float]] = []
        self._weights: list[float] = []

    def add(self, moe_aux: Sequence) -> None:
        """Add one forward call's ``ModelOutput.moe_aux`` (a list of :class:`~smoe.layers.moe.MoEAux`)."""
        if self._counts and len(moe_aux) != len(self._counts):
            raise ValueError(f"expected {len(self._counts)} MoE layers per call, got {len(moe_aux)}")
        for i, aux in enumerate(moe_aux):
            stats = aux.stats
            counts_E = stats["tokens_per_expert"].detach().double().cpu()
            plan = getattr(aux, "plan", None)
            tokens = float(getattr(plan, "num_tokens", 0) or counts_E.sum().item())
            if i == len(self._counts):
                self._counts.append(torch.zeros_like(counts_E))
                self._sums.append({"drop_rate": 0.0, "unrouted": 0.0, "entropy": 0.0, "entropy_weight": 0.0})
                self._weights.append(0.0)
            self._counts[i] += counts_E
            self._weights[i] += tokens
            s = self._sums[i]
            s["drop_rate"] += tokens * float(stats.get("drop_rate", torch.zeros(())))
            s["unrouted"] += tokens * float(stats.get("unrouted_fraction", torch.zeros(())))
            if "router_entropy" in stats:
                s["entropy"] += tokens * float(stats["router_entropy"])
                s["entropy_weight"] += tokens

    @property
    def num_layers(self) -> int:
        return len(self._counts)

    def summary(self) -> list[dict]:
        """One dict per MoE layer (see the module docstring for the keys)."""
        out = []
        for counts_E, s, w in zip(self._counts, self._sums, self._weights):
            total = counts_E.sum().item()
            layer = load_summary(counts_E)
            layer["drop_rate"] = s["drop_rate"] / w if w else 0.0
            layer["unrouted"] = s["unrouted"] / w if w else 0.0
            layer["entropy"] = s["entropy"] / s["entropy_weight"] if s["entropy_weight"] else math.nan
            layer["load"] = [(c / total if total else 0.0) for c in counts_E.tolist()]
            out.append(layer)
        return out


def summarize_layers(per_layer: list[dict]) -> dict[str, float]:
    """Means over layers of the scalar diagnostics, plus ``dead_experts`` summed over layers.

    An empty list (a dense model) gives zeros, and ``nan`` entropy.
    """
    if not per_layer:
        return {
            "load_cv": 0.0,
            "max_load": 0.0,
            "dead_experts": 0.0,
            "drop_rate": 0.0,
            "unrouted": 0.0,
            "entropy": math.nan,
        }
    keys = ("load_cv", "max_load", "drop_rate", "unrouted", "entropy")
    out = {k: sum(layer[k] for layer in per_layer) / len(per_layer) for k in keys}
    out["dead_experts"] = float(sum(layer["dead_experts"] for layer in per_layer))
    return out
