"""Hugging Face ``transformers`` Mixtral sparse-MoE block <-> :class:`smoe.MoE` (SwiGLU experts, top-k router).

Mixtral (Jiang et al. 2024) routes top-k on the logits, then softmax over the k (smoe's ``order="topk_softmax"``),
with SwiGLU experts ``w2 (silu(w1 x) * w3 x)``. Weight layouts:

=====================  ===========================================  =====================================
smoe                   transformers 5.x (``MixtralExperts``)         transformers 4.x (one module / expert)
=====================  ===========================================  =====================================
``router.gate.weight``  ``gate.weight (E, D)``                        ``gate.weight (E, D)``
``w1_EFD, w3_EFD``      ``experts.gate_up_proj (E, 2F, D)`` = cat     ``experts[e].w1.weight``, ``.w3.weight``
``w2_EDF``              ``experts.down_proj (E, D, F)``               ``experts[e].w2.weight``
=====================  ===========================================  =====================================

Both functions copy (the two modules own separate tensors). ``transformers`` is needed only when they are called.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe.experts import SwiGLUExperts
from smoe.layers.moe import MoE
from smoe.routing.gated import GatedRouter
from smoe.routing.token_choice import TokenChoiceRouter

__all__ = ["to_mixtral_block", "from_mixtral_block"]


def _check_convertible(layer: MoE) -> None:
    ex = layer.experts
    if not isinstance(ex, SwiGLUExperts) or ex.bias or layer.shared_expert is not None:
        raise ValueError("only bias-free SwiGLU experts without a shared expert map to a Mixtral block")
    router = layer.router
    if not isinstance(router, GatedRouter) or not isinstance(router.gate, nn.Linear) or router.gate.bias is not None:
        raise ValueError(
            f"router {layer.router.name!r} has no linear gate to copy into a Mixtral block (a bias-free nn.Linear)"
        )
    # what the block computes: softmax over the gate's logits, the top-k kept and renormalised (= a softmax over
    # the top-k logits), every token to its k experts, no bias in the choice. Anything else would convert without
    # a word and compute something else.
    if not isinstance(router, TokenChoiceRouter):
        raise ValueError(
            f"router {router.name!r} cannot be exported to a Mixtral block, which routes by top-k token choice"
        )
    problems = []
    if router.score_fn != "softmax":
        problems.append(f"score_fn={router.score_fn!r} (Mixtral's router is a softmax)")
    if router.order != "topk_softmax" and not router.renormalize:
        problems.append(
            f"order={router.order!r} without renormalize=True (Mixtral renormalises the top-k weights: use "
            "order='topk_softmax')"
        )
    if router.capacity_factor is not None:
        problems.append(f"capacity_factor={router.capacity_factor} (Mixtral drops no token)")
    if layer.capacity_state()[1] not in (None, (None, None)):
        problems.append("an evaluation capacity factor (Mixtral drops no token)")
    if router.noise is not None:
        problems.append(f"noise={router.noise!r} (Mixtral's block has no routing noise of this kind)")
    if router.expert_bias_E is not None:
        problems.append("expert_bias=True (a selection bias Mixtral does not have)")
    if router.eval_top_k != router.top_k:
        problems.append(f"eval_top_k={router.eval_top_k} differs from top_k={router.top_k}")
    if problems:
        raise ValueError("this layer cannot be exported to a Mixtral block: " + "; ".join(problems))


def to_mixtral_block(layer: MoE) -> nn.Module:
    """A ``MixtralSparseMoeBlock`` holding copies of ``layer``'s gate and expert weights (same dtype, device)."""
    from transformers import MixtralConfig  # noqa: PLC0415
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: PLC0415

    _check_convertible(layer)
    ex = layer.experts
    cfg = MixtralConfig(
        hidden_size=ex.dim,
        intermediate_size=ex.hidden_dim,
        num_local_experts=ex.num_experts,
        num_experts_per_tok=layer.top_k,
        hidden_act="silu",
        router_jitter_noise=0.0,
    )
    block = MixtralSparseMoeBlock(cfg).to(device=ex.w1_EFD.device, dtype=ex.w1_EFD.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
        experts = block.experts
        if hasattr(experts, "gate_up_proj"):  # transformers 5.x: stacked expert tensors
            experts.gate_up_proj.copy_(torch.cat([ex.w1_EFD, ex.w3_EFD], dim=1))
            experts.down_proj.copy_(ex.w2_EDF)
        else:  # transformers 4.x: one module per expert
            for e, expert in enumerate(experts):
                expert.w1.weight.copy_(ex.w1_EFD[e])
                expert.w3.weight.copy_(ex.w3_EFD[e])
                expert.w2.weight.copy_(ex.w2_EDF[e])
    return block


def from_mixtral_block(block: nn.Module, **moe_kwargs) -> MoE:
    """An :class:`smoe.MoE` with Mixtral's routing (``order="topk_softmax"``) holding copies of ``block``'s weights.

    Args:
        block: a ``MixtralSparseMoeBlock``.
        moe_kwargs: further :class:`smoe.MoE` options (``backend``, ``capacity_factor``, ...); router options go in
            ``router_kwargs`` and default to Mixtral's (top-k then softmax, no balance loss in the layer).
    """
    gate = block.gate.weight
    E, D = gate.shape
    experts = block.experts
    if hasattr(experts, "gate_up_proj"):
        w13 = experts.gate_up_proj
        F = w13.shape[1] // 2
        w1, w3, w2 = w13[:, :F], w13[:, F:], experts.down_proj
    else:
        w1 = torch.stack([m.w1.weight for m in experts])
        w3 = torch.stack([m.w3.weight for m in experts])
        w2 = torch.stack([m.w2.weight for m in experts])
        F = w1.shape[1]
    top_k = block.top_k  # 4.x and 5.x both keep it on the block
    router_kwargs = {"order": "topk_softmax", "balance_loss_weight": 0.0, **moe_kwargs.pop("router_kwargs", {})}
    layer = MoE(D, F, E, int(top_k), router_kwargs=router_kwargs, device=gate.device, dtype=gate.dtype, **moe_kwargs)
    with torch.no_grad():
        layer.router.gate.weight.copy_(gate)
        layer.experts.w1_EFD.copy_(w1)
        layer.experts.w3_EFD.copy_(w3)
        layer.experts.w2_EDF.copy_(w2)
    return layer
