"""Routing fluctuation: how often a fixed probe set's expert choice changes during training (StableMoE, Dai et al.,
ACL 2022; X-MoE's "routing fluctuation ratio", Chi et al. 2022; the graph-of-tokens routers claim to reduce it).

For probe tokens ``i`` with expert choices ``A_t(i)`` at evaluation ``t`` (the top-1 expert, or the set of
top-k experts for ``k > 1``)::

    fluct(t, u) = mean_i 1[A_t(i) != A_u(i)]

:func:`fluctuation_series` gives it between consecutive evaluations (X-MoE, StableMoE) and against the final one
(the abstract of the graph-of-tokens paper). Reference §3.3.4: the definition is the standard one; which of the two
each paper reports is unconfirmed, so both are returned. A frozen router has fluctuation 0 (a test checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = ["routing_fluctuation", "fluctuation_series", "choice_sets"]


def choice_sets(expert_idx_PK: Tensor) -> Tensor:
    """``(P, K)`` choices as sorted sets (the order of a token's top-k does not count), ``-1`` kept for 'none'."""
    return expert_idx_PK.sort(dim=-1).values


def routing_fluctuation(choices_a_PK: Tensor, choices_b_PK: Tensor) -> float:
    """The fraction of the ``P`` probe tokens whose expert set differs between two evaluations.

    Args:
        choices_a_PK, choices_b_PK: ``(P, K)`` (or ``(P,)`` for top-1) expert choices of the same probe tokens;
            ``-1`` marks a token no expert took.
    """
    a, b = choices_a_PK, choices_b_PK
    if a.dim() == 1:
        a, b = a.unsqueeze(-1), b.unsqueeze(-1)
    if a.shape != b.shape or a.dim() != 2 or a.shape[0] == 0:
        raise ValueError(
            f"expected two (P, K) choice tensors of one shape, P > 0; got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    changed = (choice_sets(a) != choice_sets(b)).any(dim=-1)
    return float(changed.double().mean())


def fluctuation_series(choices: Sequence[Tensor]) -> dict[str, list[float]]:
    """Fluctuation over a training run from the probe set's choices at successive evaluations.

    Returns:
        ``{"consecutive": [fluct(t, t+1) for t], "to_final": [fluct(t, T) for t]}`` (lengths ``n - 1`` and ``n``).
    """
    if len(choices) < 2:
        raise ValueError(f"fluctuation needs the choices of at least 2 evaluations, got {len(choices)}")
    final = choices[-1]
    return {
        "consecutive": [routing_fluctuation(a, b) for a, b in zip(choices, choices[1:])],
        "to_final": [routing_fluctuation(c, final) for c in choices],
    }
