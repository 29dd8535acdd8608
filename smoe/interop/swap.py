"""Training-free router swap: replace the routing rule of an already-trained model, keep its gate.

USMoE's "training-free" setting (reference §4.2.3, authors' ``Training_Free/models/modeling_olmoe.py``) keeps a
pretrained MoE's gate weights and experts and only changes the *selection rule* (token choice -> unified
competitive selection), then evaluates the model as is. :func:`swap_router` does that for any model built from
:class:`smoe.MoE` layers: every layer whose router is a :class:`~smoe.routing.token_choice.TokenChoiceRouter` gets a
new router of the requested registry name, built with the layer's sizes, and the gate weights are *copied* into it
(the new router owns its own tensor, equal to the old one). Only the gate weight carries over: token-choice
extras (the aux-loss-free expert bias, noise settings, capacity) belong to the old selection rule and are dropped.

An evaluation capacity set on a swapped layer (:meth:`smoe.MoE.set_eval_capacity`) belongs to the old selection
rule too: it is cleared.

This is model surgery on built layers, so it lives with the other interop code, above the layers it edits.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe.layers.moe import MoE
from smoe.routing.registry import build_router
from smoe.routing.token_choice import TokenChoiceRouter

__all__ = ["swap_router"]


def swap_router(model: nn.Module, name: str, *, allow_token_coupling: bool = False, **router_kwargs) -> list[str]:
    """Replace every token-choice router in ``model`` by the registered router ``name``, copying the gate.

    Args:
        model: a module holding :class:`smoe.MoE` layers (or an ``MoE`` itself).
        name: registry name of the new router (e.g. ``"usmoe"``); it must have a ``gate`` of the same shape.
        allow_token_coupling: set ``allow_token_coupling=True`` on the swapped *causal* layers, i.e. accept that a
            coupling router (USMoE in ``group_mode="batch"``) leaks future tokens, as the authors' embedding
            evaluation does. Without it, a swap that would make a causal layer leak raises ``ValueError`` and leaves
            the model unchanged.
        router_kwargs: options of the new router (e.g. ``rate=0.5``).

    Returns:
        The qualified names of the swapped MoE layers (empty if the model has no token-choice router).
    """
    swapped: list[tuple[str, MoE, nn.Module, bool, tuple]] = []
    try:
        for qualname, module in model.named_modules():
            if not isinstance(module, MoE) or not isinstance(module.router, TokenChoiceRouter):
                continue
            old = module.router
            weight = old.gate.weight
            new = build_router(
                name,
                dim=old.dim,
                num_experts=old.num_experts,
                top_k=old.top_k,
                capacity_factor=None,  # the new selection rule decides its own budget
                device=weight.device,
                dtype=weight.dtype,
                **router_kwargs,
            )
            gate = getattr(new, "gate", None)
            if not isinstance(gate, nn.Linear) or gate.weight.shape != weight.shape:
                raise ValueError(
                    f"router {name!r} has no gate of shape {tuple(weight.shape)} to receive the trained gate weights"
                )
            with torch.no_grad():
                gate.weight.copy_(weight)
            new.train(old.training)
            swapped.append((qualname, module, old, module.allow_token_coupling, module.capacity_state()))
            module.clear_eval_capacity()
            module.router = new
            if allow_token_coupling and module.causal:
                module.allow_token_coupling = True
            module.check_causal_safety()
    except Exception:
        for _, module, old, allow, capacity in reversed(swapped):  # leave the model as it was
            module.router, module.allow_token_coupling = old, allow
            module.restore_capacity_state(capacity)
        raise
    return [qualname for qualname, *_ in swapped]
