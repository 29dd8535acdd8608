"""Routers with a learned gate and the standard auxiliary losses: the base of most routers here.

The gate maps a token to ``E`` float32 logits. By default it is one bias-free linear layer, ``logits = x W^T``
(``router.gate`` is an ``nn.Linear`` whose ``weight`` is ``(E, D)``, the layout Hugging Face MoE blocks use).
``gate_hidden_dims`` makes it an MLP, ``Linear -> ReLU -> ... -> Linear`` with biases (:class:`MLPGate`, the
SMoE-VAE's gating network on the latent, Nikolic et al. 2025, reference §9.3); ``gate_bias=True`` adds a bias to
the linear gate. The last layer always runs in float32 (selective precision, Switch Transformer §2.4).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from smoe.routing.base import Router, router_logits_fp32
from smoe.routing.losses import (
    gshard_balance_loss,
    importance_loss,
    load_loss,
    router_z_loss,
    switch_balance_loss,
)
from smoe.routing.options import choice, flag, int_tuple, real

__all__ = ["GatedRouter", "MLPGate"]


class MLPGate(nn.Module):
    """An MLP gate ``D -> h1 -> ... -> E`` with ReLU between layers and biases everywhere; float32 logits.

    The layers keep ``nn.Linear``'s default initialisation (as the SMoE-VAE authors' ``GatingNetwork``); the hidden
    layers run in the autocast dtype, the output layer in float32.

    Args:
        dim: input width ``D``.
        hidden_dims: widths of the hidden layers (at least one).
        num_experts: ``E``.
    """

    def __init__(self, dim: int, hidden_dims: tuple[int, ...], num_experts: int, device=None, dtype=None) -> None:
        super().__init__()
        dims = (dim, *hidden_dims)
        self.hidden = nn.ModuleList(nn.Linear(a, b, device=device, dtype=dtype) for a, b in zip(dims, dims[1:]))
        self.out = nn.Linear(dims[-1], num_experts, device=device, dtype=dtype)

    def forward(self, x_TD: Tensor) -> Tensor:
        h = x_TD
        for layer in self.hidden:
            h = F.relu(layer(h))
        return router_logits_fp32(h, self.out.weight, self.out.bias)


class GatedRouter(Router):
    """Shared machinery of routers with a learned gate (module docstring) and the standard losses.

    Args:
        dim: model width ``D``.
        num_experts: ``E``.
        top_k: ``K``.
        capacity_factor: capacity factor or ``None``.
        balance_loss_weight: weight of the load-balancing loss (``alpha = 1e-2`` in Switch). Hugging Face's
            ``load_balancing_loss_func`` (Mixtral family) divides the expert counts by the number of tokens where
            :func:`~smoe.routing.losses.switch_balance_loss` divides by tokens times ``K``, so its value is ``K``
            times ours and ``balance_loss_weight = router_aux_loss_coef * K`` reproduces HF's weighted loss and its
            gradient. HF pools the tokens of the whole batch and of all layers into one loss, so the identity
            holds for one layer's tokens taken as one group (one routing group, or ``balance_loss_scope="global"``).
        balance_loss_type: ``"switch"`` (default): :func:`~smoe.routing.losses.switch_balance_loss`, counting all
            ``K`` choices, on the clean probabilities. ``"gshard"``: GShard's ``l_aux``
            (:func:`~smoe.routing.losses.gshard_balance_loss`), counting only each token's top-1 choice, on the
            gates the router routed with, as vmoe does: with noisy gating (``token_choice``'s gaussian noise) the
            *noisy* softmax, both for the top-1 counts and for the mean gates (vmoe
            ``NoisyTopExpertsPerItemRouter``). Routers without noise pass their probabilities for both.
        z_loss_weight: weight of the ST-MoE router z-loss (``1e-3`` in ST-MoE).
        importance_loss_weight: weight of the V-MoE importance loss (0.005 in V-MoE).
        load_loss_weight: weight of the V-MoE load loss (0.005 in V-MoE; needs gaussian noise).
        gate_init_std: std of the normal init of a linear gate (flaxformer ``normal(2e-2)``); MLP gates keep
            ``nn.Linear``'s default.
        gate_hidden_dims: hidden widths of an MLP gate; empty (default) for the linear gate.
        gate_bias: a bias on the linear gate (MLP gates always have biases).
        balance_loss_scope: ``"group"`` (per routing group, the default) or ``"global"`` (over every token of the
            call and every rank of the default process group: Megatron-Core's global auxiliary loss, for expert
            or data parallelism; :func:`~smoe.routing.losses.switch_balance_loss`).
    """

    OPTIONS = {
        "balance_loss_weight": real(ge=0),
        "z_loss_weight": real(ge=0),
        "importance_loss_weight": real(ge=0),
        "load_loss_weight": real(ge=0),
        "gate_init_std": real(ge=0),
        "gate_hidden_dims": int_tuple(),
        "gate_bias": flag(),
        "balance_loss_scope": choice("group", "global"),
        "balance_loss_type": choice("switch", "gshard"),
    }

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float | None = None,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        importance_loss_weight: float = 0.0,
        load_loss_weight: float = 0.0,
        gate_init_std: float = 0.02,
        gate_hidden_dims: tuple[int, ...] = (),
        gate_bias: bool = False,
        balance_loss_scope: str = "group",
        balance_loss_type: str = "switch",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(dim=dim, num_experts=num_experts, top_k=top_k)
        hidden = tuple(gate_hidden_dims)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"gate_hidden_dims must be positive integers, got {gate_hidden_dims!r}")
        if balance_loss_scope not in ("group", "global"):
            raise ValueError(f"balance_loss_scope must be 'group' or 'global', got {balance_loss_scope!r}")
        if balance_loss_type not in ("switch", "gshard"):
            raise ValueError(f"balance_loss_type must be 'switch' or 'gshard', got {balance_loss_type!r}")
        self.balance_loss_scope = balance_loss_scope
        self.balance_loss_type = balance_loss_type
        self.capacity_factor = capacity_factor
        self.balance_loss_weight = balance_loss_weight
        self.z_loss_weight = z_loss_weight
        self.importance_loss_weight = importance_loss_weight
        self.load_loss_weight = load_loss_weight
        if hidden:
            self.gate: nn.Module = MLPGate(dim, hidden, num_experts, device=device, dtype=dtype)
        else:
            self.gate = nn.Linear(dim, num_experts, bias=gate_bias, device=device, dtype=dtype)
            nn.init.normal_(self.gate.weight, std=gate_init_std)
            if gate_bias:
                nn.init.zeros_(self.gate.bias)

    def logits(self, x_TD: Tensor) -> Tensor:
        """``(T, E)`` float32 router logits."""
        if isinstance(self.gate, nn.Linear):
            return router_logits_fp32(x_TD, self.gate.weight, self.gate.bias)
        return self.gate(x_TD)

    def standard_losses(
        self,
        logits_GSE: Tensor,
        probs_GSE: Tensor,
        expert_idx_GSK: Tensor | None,
        noisy_logits_GSE: Tensor | None = None,
        noise_std: float = 0.0,
        routed_probs_GSE: Tensor | None = None,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Compute the enabled losses; returns ``(unweighted losses by name, weighted sum)``.

        Args:
            logits_GSE: ``(G, S, E)`` clean logits (z-loss, load loss).
            probs_GSE: ``(G, S, E)`` clean probabilities (importance loss, the Switch balance loss).
            expert_idx_GSK: ``(G, S, K)`` the router's choices, best first, or ``None`` (no balance loss).
            noisy_logits_GSE, noise_std: the noisy logits and the noise std of the load loss.
            routed_probs_GSE: ``(G, S, E)`` the (noisy) gates the router chose with, for the GShard balance loss;
                ``None``: ``probs_GSE``.
        """
        losses: dict[str, Tensor] = {}
        total = logits_GSE.new_zeros(())
        if self.balance_loss_weight and expert_idx_GSK is not None:
            if self.balance_loss_type == "gshard":
                gates_GSE = probs_GSE if routed_probs_GSE is None else routed_probs_GSE
                losses["balance"] = gshard_balance_loss(gates_GSE, expert_idx_GSK, scope=self.balance_loss_scope)
            else:
                losses["balance"] = switch_balance_loss(probs_GSE, expert_idx_GSK, scope=self.balance_loss_scope)
            total = total + self.balance_loss_weight * losses["balance"]
        if self.z_loss_weight:
            losses["z"] = router_z_loss(logits_GSE)
            total = total + self.z_loss_weight * losses["z"]
        if self.importance_loss_weight:
            losses["importance"] = importance_loss(probs_GSE)
            total = total + self.importance_loss_weight * losses["importance"]
        if self.load_loss_weight and noisy_logits_GSE is not None and noise_std > 0:
            losses["load"] = load_loss(logits_GSE, noisy_logits_GSE, noise_std, expert_idx_GSK.shape[-1])
            total = total + self.load_loss_weight * losses["load"]
        return losses, total
