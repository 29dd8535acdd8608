"""Auxiliary routing losses as pure functions (reference §2 and §3.1.4).

All take per-group tensors ``(G, S, E)`` (``G`` routing groups of ``S`` tokens), compute the loss per group as the
papers' code does (vmoe, flaxformer) and average over groups. They return unweighted scalars; the router multiplies
by its loss weights. Compute them in float32.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["switch_balance_loss", "gshard_balance_loss", "router_z_loss", "importance_loss", "load_loss", "cv_squared"]


def switch_balance_loss(
    probs_GSE: Tensor, expert_idx_GSK: Tensor, *, scope: str = "group", process_group=None
) -> Tensor:
    """Switch Transformer load-balancing loss ``E * sum_i f_i * P_i`` (Fedus et al. 2021, eq. 4), over all ``K``
    choices.

    ``f_i`` is the fraction of the ``S*K`` assignments that chose expert ``i`` (before capacity dropping;
    Megatron-Core's normalisation by ``S*K``, so that the loss is 1 at perfect balance for every ``K``), ``P_i`` the
    mean router probability of expert ``i``. Gradients flow through ``P`` only. For ``K = 1`` this is Switch's
    eq. 4 and equals GShard's ``l_aux``; for ``K > 1`` it counts every choice, while GShard's ``l_aux``
    (:func:`gshard_balance_loss`) counts only the top-1 choices. Hugging Face's ``load_balancing_loss_func``
    (Mixtral family) normalises the counts by ``S`` instead of ``S*K``, so its value is ``K`` times this one (on
    the same tokens and probabilities).

    ``scope="group"`` (default) computes the loss per routing group and averages over groups. ``scope="global"``
    takes ``f`` over every assignment of the call and, when ``torch.distributed`` is initialised, over every rank of
    ``process_group`` (counts summed with ``all_reduce``), with ``P`` over this rank's tokens: Megatron-Core's
    "global" auxiliary loss. With equal token counts per rank, the mean of the ranks' losses (what data-parallel
    gradient averaging differentiates) is then the loss of one process holding all the ranks' tokens.

    Args:
        probs_GSE: ``(G, S, E)`` router probabilities.
        expert_idx_GSK: ``(G, S, K)`` selected experts.
        scope: ``"group"`` or ``"global"``.
        process_group: the ranks ``"global"`` reduces over (``None``: the default group).

    Returns:
        Scalar loss; 1.0 when routing is uniform.
    """
    G, S, E = probs_GSE.shape
    K = expert_idx_GSK.shape[-1]
    counts_GE = torch.zeros(G, E, device=probs_GSE.device, dtype=probs_GSE.dtype)
    counts_GE.scatter_add_(
        1, expert_idx_GSK.reshape(G, S * K), torch.ones_like(expert_idx_GSK, dtype=probs_GSE.dtype).reshape(G, S * K)
    )
    if scope == "group":
        f_GE = counts_GE / (S * K)
        P_GE = probs_GSE.mean(dim=1)
        return (E * (f_GE * P_GE).sum(dim=-1)).mean()
    if scope != "global":
        raise ValueError(f"balance loss scope must be 'group' or 'global', got {scope!r}")
    counts_E1 = torch.cat([counts_GE.sum(dim=0), counts_GE.new_full((1,), G * S * K)])  # counts and their total
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts_E1, group=process_group)
    f_E = counts_E1[:E] / counts_E1[E]
    P_E = probs_GSE.mean(dim=(0, 1))
    return E * (f_E * P_E).sum()


def gshard_balance_loss(
    probs_GSE: Tensor, expert_idx_GSK: Tensor, *, scope: str = "group", process_group=None
) -> Tensor:
    """GShard auxiliary loss ``l_aux = E^2 * mean_i(ce_i * me_i) = E * sum_i ce_i * me_i`` (Lepikhin et al. 2020,
    Algorithm 1; vmoe ``NoisyTopExpertsPerItemRouter._gshard_auxiliary_loss``, whose ``E^2`` follows lingvo).

    ``ce_i`` is the fraction of the ``S`` tokens whose *top-1* choice is expert ``i`` (vmoe: the argmax of the
    gates, which is the first of the router's choices for softmax top-k), ``me_i`` the mean gate of expert ``i``;
    the later choices of a top-k router do not count. This is :func:`switch_balance_loss` on the first choice
    only, with the same ``scope`` and per-group averaging. vmoe passes the gates it routed with: the *noisy* gates
    when noise is on (the router chooses which probabilities to pass).

    Args:
        probs_GSE: ``(G, S, E)`` gates (softmax probabilities).
        expert_idx_GSK: ``(G, S, K)`` selected experts, best first; only ``[..., 0]`` is read.
        scope / process_group: as :func:`switch_balance_loss`.

    Returns:
        Scalar loss; 1.0 when routing is uniform.
    """
    return switch_balance_loss(probs_GSE, expert_idx_GSK[..., :1], scope=scope, process_group=process_group)


def router_z_loss(logits_GSE: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_x (logsumexp_j logit_j(x))^2`` (Zoph et al. 2022, eq. 5)."""
    return torch.logsumexp(logits_GSE.float(), dim=-1).pow(2).mean()


def cv_squared(values_GE: Tensor) -> Tensor:
    """Squared coefficient of variation per group with the population std (ddof=0, as jnp.std), averaged."""
    mean_G = values_GE.mean(dim=-1)
    var_G = values_GE.var(dim=-1, unbiased=False)
    return (var_G / mean_G.pow(2).clamp_min(1e-20)).mean()


def importance_loss(probs_GSE: Tensor) -> Tensor:
    """V-MoE importance loss ``(std(Imp) / mean(Imp))^2`` with ``Imp_i = sum_s p[s, i]`` (Riquelme et al. 2021, A.2).

    ``probs_GSE`` are the *clean* softmax probabilities, even when noise is on (vmoe ``_importance_auxiliary_loss``).
    """
    return cv_squared(probs_GSE.sum(dim=1))


def load_loss(logits_GSE: Tensor, noisy_logits_GSE: Tensor, noise_std: float, top_k: int) -> Tensor:
    """V-MoE load loss (Riquelme et al. 2021, Appendix A.2; vmoe ``_load_auxiliary_loss``).

    ``p[s, i] = 1 - Phi((thr_s - logits[s, i]) / sigma)`` is the probability that expert ``i`` would still be in the
    top-k if its noise were re-sampled, with ``thr_s`` the k-th largest *noisy* logit of token ``s`` and the *clean*
    logits in the numerator. ``load_i = sum_s p[s, i]`` and the loss is its squared coefficient of variation.
    Undefined without noise (``noise_std`` must be > 0).
    """
    if noise_std <= 0:
        raise ValueError(f"load_loss needs noise_std > 0, got {noise_std}")
    threshold_GS1 = noisy_logits_GSE.topk(top_k, dim=-1).values[..., -1:]
    z_GSE = (threshold_GS1 - logits_GSE) / noise_std
    # 1 - Phi(z) = 0.5 * erfc(z / sqrt(2))
    p_GSE = 0.5 * torch.erfc(z_GSE / math.sqrt(2.0))
    return cv_squared(p_GSE.sum(dim=1))
