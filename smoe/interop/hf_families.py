"""Hugging Face ``transformers`` MoE blocks <-> :class:`smoe.MoE`, one converter per family.

``from_hf(block)`` builds the :class:`smoe.MoE` that computes what ``block`` computes (same routing rule, copies of
its weights); ``to_hf(layer, block)`` copies a layer's weights into a block of the same family after checking that
the layer still routes as the block does. The converter is chosen by the block's class name, so ``transformers``
is imported only by the caller. What each family computes and its weight layout (surveyed on ``transformers``
5.24; ``../shared/reference/hf_moe_families.md``):

==================  =================================  ===================================================
family (HF class)   smoe routing                        experts, extras
==================  =================================  ===================================================
Mixtral, Granite    token choice, ``topk_softmax``      SwiGLU
OLMoE, Qwen3-MoE    ``softmax_topk``, ``renormalize``   SwiGLU
                    = ``norm_topk_prob``
DBRX                ``softmax_topk``, ``renormalize``   SwiGLU; ``w2`` stored ``(E*F, D)`` (transposed)
                    by the ``L_p`` norm
                    (``moe_normalize_expert_weights``)
Qwen2-MoE,          ``softmax_topk`` (``norm_topk``)    SwiGLU + shared expert gated by
Qwen3-Next                                              ``sigmoid(x W_g)`` (``shared_expert_gate=True``)
DeepSeek-V3         sigmoid, ``expert_bias`` =          SwiGLU + ungated shared experts
                    ``e_score_correction_bias``,
                    group-limited (``n_group``,
                    ``topk_group``, top-2-sum), renorm,
                    ``routed_scaling_factor``
DeepSeek-V2         softmax, greedy or group-limited    SwiGLU + ungated shared experts
                    (group max), routed scaling
ERNIE-4.5           ``softmax_topk``, ``expert_bias``,  SwiGLU + ungated shared experts; HF's aux loss
                    renorm                              counts the unbiased top-k (``balance_count``)
Switch              top-1 softmax, absolute             ReLU MLP (``wi``, ``wo``); per-sequence capacity
Transformers        ``expert_capacity``, z + balance    (``group_mode="sequence"``)
GPT-OSS             router bias, ``topk_softmax``       ``clamped_swiglu`` with biases; gate/up
                                                        interleaved in ``gate_up_proj (E, D, 2F)``
Llama-4             top-k sigmoid on the logits, the    SwiGLU (``gate_up_proj (E, D, 2F)``) + shared
                    score scales the expert *input*     expert
                    (``weight_inputs=True``)
NLLB-MoE            top-2 ``softmax_topk``, absolute    ReLU MLP with biases; the two weights renormalised
                    capacity, optional BPR              after dropping (``normalize_weights=True``), or
                                                        before it only (``renormalize=True``)
==================  =================================  ===================================================

Where smoe and the block differ on purpose, it is said here and checked by ``to_hf``:

* Router scores: smoe computes the gate logits in float32 (selective precision); most HF blocks compute them in
  the model dtype and the softmax in float32. In float64 the two agree to about 1e-7.
* Training-time jitter (Mixtral, DBRX, Switch: ``x *= U(1 - eps, 1 + eps)``): HF multiplies the hidden states in
  place, so the experts see the jittered input as well; smoe jitters the router's input only. Eval-mode outputs
  are identical. The converters carry the jitter setting over.
* NLLB-MoE's experts in ``transformers`` 5.24 run only experts 0 and 1 (``NllbMoeExperts`` one-hot encodes the
  router's 0/1 mask instead of the expert ids), so the NLLB oracle is the router's kept set and weights only.
* Auxiliary losses: HF computes them at the model level from the recorded router logits; smoe's layer returns them
  (``aux.losses``). ``router_aux_loss_coef * K`` is smoe's ``balance_loss_weight`` for the Mixtral-style
  ``load_balancing_loss_func``; the converters leave the loss weights at 0 (set them for training).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from smoe.experts import MLP, ClampedSwiGLUExperts, MLPExperts
from smoe.layers.moe import MoE
from smoe.routing.registry import build_router
from smoe.routing.token_choice import TokenChoiceRouter

__all__ = ["HFFamily", "FAMILIES", "family_of", "from_hf", "to_hf", "supported_block_classes"]


# -- weight layouts ----------------------------------------------------------------------------------------------


def _fused(experts: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """v5 fused experts: ``gate_up_proj (E, 2F, D) = cat(w1, w3)``, ``down_proj (E, D, F) = w2``."""
    F_ = experts.gate_up_proj.shape[1] // 2
    return experts.gate_up_proj[:, :F_], experts.gate_up_proj[:, F_:], experts.down_proj


def _set_fused(experts: nn.Module, w1: Tensor, w3: Tensor, w2: Tensor) -> None:
    experts.gate_up_proj.copy_(torch.cat([w1, w3], dim=1))
    experts.down_proj.copy_(w2)


def _transposed_chunked(experts: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """Llama-4: ``gate_up_proj (E, D, 2F)``, gate the first ``F`` columns; ``down_proj (E, F, D)``."""
    F_ = experts.gate_up_proj.shape[2] // 2
    w13 = experts.gate_up_proj.transpose(1, 2)
    return w13[:, :F_], w13[:, F_:], experts.down_proj.transpose(1, 2)


def _set_transposed_chunked(experts: nn.Module, w1: Tensor, w3: Tensor, w2: Tensor) -> None:
    experts.gate_up_proj.copy_(torch.cat([w1, w3], dim=1).transpose(1, 2))
    experts.down_proj.copy_(w2.transpose(1, 2))


def _gpt_oss(experts: nn.Module) -> tuple[Tensor, ...]:
    """GPT-OSS: ``gate_up_proj (E, D, 2F)`` with gate at even and up at odd columns, biases likewise."""
    w13 = experts.gate_up_proj.transpose(1, 2)  # (E, 2F, D)
    b13 = experts.gate_up_proj_bias
    w2 = experts.down_proj.transpose(1, 2)  # (E, F, D) -> (E, D, F)
    return w13[:, 0::2], w13[:, 1::2], w2, b13[:, 0::2], b13[:, 1::2], experts.down_proj_bias


def _set_gpt_oss(experts: nn.Module, ex: MLPExperts) -> None:
    E, F_, D = ex.w1_EFD.shape
    w13 = torch.stack([ex.w1_EFD, ex.w3_EFD], dim=2).reshape(E, 2 * F_, D)  # interleave rows: g0 u0 g1 u1 ...
    experts.gate_up_proj.copy_(w13.transpose(1, 2))
    experts.gate_up_proj_bias.copy_(torch.stack([ex.b1_EF, ex.b3_EF], dim=2).reshape(E, 2 * F_))
    experts.down_proj.copy_(ex.w2_EDF.transpose(1, 2))
    experts.down_proj_bias.copy_(ex.b2_ED)


def _dbrx(experts: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """DBRX: ``w1``, ``v1`` (gate, up) ``(E*F, D)``; ``w2 (E*F, D)`` applied as ``h @ w2_e`` (so ``w2_e^T``)."""
    mlp = experts.mlp
    E, F_ = experts.num_experts, experts.ffn_hidden_size
    D = mlp.w1.shape[1]
    return mlp.w1.view(E, F_, D), mlp.v1.view(E, F_, D), mlp.w2.view(E, F_, D).transpose(1, 2)


def _set_dbrx(experts: nn.Module, w1: Tensor, w3: Tensor, w2: Tensor) -> None:
    mlp = experts.mlp
    mlp.w1.copy_(w1.reshape(mlp.w1.shape))
    mlp.v1.copy_(w3.reshape(mlp.v1.shape))
    mlp.w2.copy_(w2.transpose(1, 2).reshape(mlp.w2.shape))


def _module_dict(names: tuple[str, str]) -> Callable[[nn.Module], tuple[Tensor, ...]]:
    """One ``nn.Linear`` pair per expert (Switch ``wi``/``wo``, NLLB ``fc1``/``fc2``): ``(w1, w2, b1, b2)``."""
    first, second = names

    def read(experts: nn.Module) -> tuple[Tensor, ...]:
        mods = [experts[f"expert_{e}"] for e in range(experts.num_experts)]
        w1 = torch.stack([getattr(m, first).weight for m in mods])
        w2 = torch.stack([getattr(m, second).weight for m in mods])
        b1 = None if getattr(mods[0], first).bias is None else torch.stack([getattr(m, first).bias for m in mods])
        b2 = None if getattr(mods[0], second).bias is None else torch.stack([getattr(m, second).bias for m in mods])
        return w1, w2, b1, b2

    return read


def _set_module_dict(names: tuple[str, str], experts: nn.Module, ex: MLPExperts) -> None:
    first, second = names
    for e in range(experts.num_experts):
        m = experts[f"expert_{e}"]
        getattr(m, first).weight.copy_(ex.w1_EFD[e])
        getattr(m, second).weight.copy_(ex.w2_EDF[e])
        if ex.bias:
            getattr(m, first).bias.copy_(ex.b1_EF[e])
            getattr(m, second).bias.copy_(ex.b2_ED[e])


def _hf_mlp(mlp: nn.Module) -> MLP:
    """An smoe SwiGLU :class:`~smoe.experts.MLP` copy of an HF ``gate_proj`` / ``up_proj`` / ``down_proj`` MLP."""
    _check_silu(getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None), type(mlp).__name__)
    w = mlp.gate_proj.weight
    out = MLP(w.shape[1], w.shape[0], "swiglu", bias=mlp.gate_proj.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            getattr(out, ours).weight.copy_(getattr(mlp, theirs).weight)
            if getattr(mlp, theirs).bias is not None:
                getattr(out, ours).bias.copy_(getattr(mlp, theirs).bias)
    return out


def _set_hf_mlp(mlp: nn.Module, ours: nn.Module) -> None:
    if not isinstance(ours, MLP) or ours.activation != "swiglu":
        raise ValueError(f"the shared expert must be a SwiGLU smoe MLP to go into {type(mlp).__name__}")
    for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        if getattr(mlp, b).weight.shape != getattr(ours, a).weight.shape:
            raise ValueError(
                f"shared expert {a} has shape {tuple(getattr(ours, a).weight.shape)}, the block's {b} "
                f"{tuple(getattr(mlp, b).weight.shape)}"
            )
        getattr(mlp, b).weight.copy_(getattr(ours, a).weight)
        if getattr(mlp, b).bias is not None:
            getattr(mlp, b).bias.copy_(getattr(ours, a).bias)


def _act_name(act: nn.Module | None) -> str:
    return type(act).__name__ if act is not None else "None"


def _check_silu(act: nn.Module | None, where: str) -> None:
    if not isinstance(act, nn.SiLU) and _act_name(act) not in ("SiLUActivation", "SiLU"):
        raise ValueError(f"{where} uses activation {_act_name(act)}; smoe's SwiGLU experts need SiLU")


# -- families ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFFamily:
    """How one Hugging Face MoE block maps onto :class:`smoe.MoE`.

    Attributes:
        name: the family (``"olmoe"``).
        block_classes: the HF class names this converter takes.
        build: ``block -> MoE`` with the block's routing and copies of its weights.
        export: ``(layer, block) -> None``, copies ``layer``'s weights into ``block`` (no grad).
        router: ``block -> dict``, the :class:`~smoe.routing.token_choice.TokenChoiceRouter` options that
            reproduce the block's routing: what ``build`` builds with and what ``to_hf`` checks a layer against.
        top_k: ``block -> K``.
        returns: what the block's ``forward`` returns: ``"tensor"``, or ``"tuple"`` (output, router tensor).
        layer: ``block -> dict``, the :class:`smoe.MoE` options of the block's routing beyond the router (group
            mode, normalisation after dropping, input-side weights), likewise built with and checked.
    """

    name: str
    block_classes: tuple[str, ...]
    build: Callable[..., MoE]
    export: Callable[[MoE, nn.Module], None]
    router: Callable[[nn.Module], dict]
    top_k: Callable[[nn.Module], int] = lambda block: int(_gate(block).top_k)
    returns: str = "tensor"
    layer: Callable[[nn.Module], dict] = lambda block: {}


def _layer(D, F_, E, K, block_weight: Tensor, router_kwargs: dict, **moe_kwargs) -> MoE:
    router_kwargs = {"balance_loss_weight": 0.0, **router_kwargs}
    return MoE(
        D, F_, E, K, router="token_choice", router_kwargs=router_kwargs, device=block_weight.device,
        dtype=block_weight.dtype, **moe_kwargs,
    )  # fmt: skip


def _copy_experts(layer: MoE, w1: Tensor, w3: Tensor | None, w2: Tensor, b1=None, b3=None, b2=None) -> None:
    ex = layer.experts
    with torch.no_grad():
        for name, value in (("w1_EFD", w1), ("w3_EFD", w3), ("w2_EDF", w2), ("b1_EF", b1), ("b3_EF", b3)):
            if value is not None:
                getattr(ex, name).copy_(value)
        if b2 is not None:
            ex.b2_ED.copy_(b2)


#: router attributes that decide what a token-choice router computes (its option names)
_ROUTING_FIELDS = ("top_k", "score_fn", "order", "renormalize", "renormalize_p", "num_expert_groups",
                   "topk_expert_groups", "expert_group_score", "routed_scaling_factor", "capacity_factor",
                   "expert_capacity", "batch_priority")  # fmt: skip


def _relevant(router: TokenChoiceRouter, attr: str) -> bool:
    """Whether ``attr`` changes what ``router`` computes (e.g. ``renormalize`` does not after a top-k softmax)."""
    if attr in ("renormalize", "renormalize_p") and router.score_fn == "softmax" and router.order == "topk_softmax":
        return False
    if attr == "renormalize_p" and not router.renormalize:
        return False
    if attr == "expert_group_score" and router.num_expert_groups is None:
        return False
    return not (attr == "batch_priority" and router.capacity_factor is None and router.expert_capacity is None)


def _check_layer(layer: MoE, family: HFFamily, block: nn.Module) -> None:
    """Raise ``ValueError`` listing every way ``layer`` would compute something else than ``block``: its router is
    compared with the router :func:`from_hf` builds for ``block`` (on the meta device: no weights)."""
    if not isinstance(layer, MoE):
        raise ValueError(f"to_hf takes an smoe.MoE, got {type(layer).__name__}")
    router = layer.router
    if not isinstance(router, TokenChoiceRouter):
        raise ValueError(
            f"router {router.name!r} cannot go into a {type(block).__name__}, which routes by token choice "
            "(swap it back, or keep the model in smoe)"
        )
    want = build_router(
        "token_choice", dim=router.dim, num_experts=router.num_experts, top_k=family.top_k(block), device="meta",
        **family.router(block),
    )  # fmt: skip
    problems = []
    for attr in _ROUTING_FIELDS:
        have, need = getattr(router, attr), getattr(want, attr)
        if not (_relevant(router, attr) or _relevant(want, attr)) or have == need:
            continue
        if isinstance(need, float) and isinstance(have, int | float) and abs(have - need) <= 1e-12 * max(1, abs(need)):
            continue
        problems.append(f"{attr}={have!r} (the block needs {need!r})")
    if (router.expert_bias_E is None) != (want.expert_bias_E is None):
        need = "needs" if want.expert_bias_E is not None else "does not have"
        problems.append(f"expert_bias={router.expert_bias_E is not None} (the block {need} a selection bias)")
    for attr, need in family.layer(block).items():
        if getattr(layer, attr) != need:
            problems.append(f"{attr}={getattr(layer, attr)!r} (the block needs {need!r})")
    if router.noise is not None and router.noise != "jitter":
        problems.append(f"noise={router.noise!r} (the block has no such routing noise)")
    if layer.capacity_state()[1] not in (None, (None, None)):
        problems.append("an evaluation capacity factor (set_eval_capacity)")
    if router.top_k != router.eval_top_k:
        problems.append(f"eval_top_k={router.eval_top_k} differs from top_k={router.top_k}")
    if problems:
        raise ValueError(f"this layer cannot be exported to {type(block).__name__}: " + "; ".join(problems))


# Mixtral-style fused SwiGLU families -----------------------------------------------------------------------------


def _router_weight(block: nn.Module) -> Tensor:
    return _gate(block).weight


def _jitter(eps) -> dict:
    """Switch-style input jitter (training only) when the block has one."""
    eps = float(eps or 0.0)
    return {"noise": "jitter", "jitter_eps": eps} if eps > 0 else {}


def _topk_softmax_router(block: nn.Module) -> dict:
    return {"order": "topk_softmax", **_jitter(getattr(block, "jitter_noise", 0.0))}


def _softmax_topk_router(block: nn.Module) -> dict:
    return {"order": "softmax_topk", "renormalize": bool(_gate(block).norm_topk_prob)}


def _gate(block: nn.Module) -> nn.Module:
    return block.gate if hasattr(block, "gate") else block.router


def _copy_gate(layer: MoE, weight: Tensor, bias: Tensor | None = None) -> None:
    with torch.no_grad():
        layer.router.gate.weight.copy_(weight)
        if bias is not None:
            layer.router.gate.bias.copy_(bias)


def _build_fused(block: nn.Module, router: Callable[[nn.Module], dict], **moe_kwargs) -> MoE:
    _check_silu(block.experts.act_fn, type(block).__name__)
    w1, w3, w2 = _fused(block.experts)
    gate_w = _router_weight(block)
    E, D = gate_w.shape
    router_kwargs = {**router(block), **moe_kwargs.pop("router_kwargs", {})}
    layer = _layer(D, w1.shape[1], E, _gate(block).top_k, w1, router_kwargs, **moe_kwargs)
    _copy_gate(layer, gate_w)
    _copy_experts(layer, w1, w3, w2)
    return layer


def _export_fused(layer: MoE, block: nn.Module) -> None:
    ex = layer.experts
    _check_plain_swiglu(ex, block)
    _router_weight(block).copy_(layer.router.gate.weight)
    _set_fused(block.experts, ex.w1_EFD, ex.w3_EFD, ex.w2_EDF)


def _check_plain_swiglu(ex, block) -> None:
    if type(ex).__name__ != "SwiGLUExperts" or ex.bias:
        raise ValueError(f"only bias-free SwiGLU experts go into {type(block).__name__}, got {ex!r}")


def _build_mixtral(block: nn.Module, **kw) -> MoE:
    return _build_fused(block, _topk_softmax_router, **kw)


def _build_softmax_topk(block: nn.Module, **kw) -> MoE:
    return _build_fused(block, _softmax_topk_router, **kw)


def _check_no_shared(layer: MoE, block: nn.Module) -> None:
    if layer.shared_expert is not None:
        raise ValueError(f"{type(block).__name__} has no shared expert; the layer has one")


def _export_plain(layer: MoE, block: nn.Module) -> None:
    _check_no_shared(layer, block)
    _export_fused(layer, block)


# Qwen2-MoE / Qwen3-Next: + sigmoid-gated shared expert


def _build_qwen2(block: nn.Module, **kw) -> MoE:
    shared = _hf_mlp(block.shared_expert)
    layer = _build_softmax_topk(block, shared_expert=shared, shared_expert_gate=True, **kw)
    with torch.no_grad():
        layer.shared_expert_gate.weight.copy_(block.shared_expert_gate.weight)
    return layer


def _export_qwen2(layer: MoE, block: nn.Module) -> None:
    if layer.shared_expert is None or layer.shared_expert_gate is None:
        raise ValueError(f"{type(block).__name__} needs a shared expert with a sigmoid gate")
    _export_fused(layer, block)
    _set_hf_mlp(block.shared_expert, layer.shared_expert)
    block.shared_expert_gate.weight.copy_(layer.shared_expert_gate.weight)


# DeepSeek-V3 / V2 / ERNIE-4.5: + ungated shared experts


def _deepseek_v3_router(block: nn.Module) -> dict:
    g = block.gate
    return {"score_fn": "sigmoid", "renormalize": bool(g.norm_topk_prob), "expert_bias": True,
            "num_expert_groups": g.num_group, "topk_expert_groups": g.topk_group, "expert_group_score": "top2_sum",
            "routed_scaling_factor": float(g.routed_scaling_factor)}  # fmt: skip


def _build_deepseek_v3(block: nn.Module, **kw) -> MoE:
    layer = _build_fused(block, _deepseek_v3_router, shared_expert=_hf_mlp(block.shared_experts), **kw)
    with torch.no_grad():
        layer.router.expert_bias_E.copy_(block.gate.e_score_correction_bias)
    return layer


def _export_with_shared(layer: MoE, block: nn.Module, shared: nn.Module | None) -> None:
    if (layer.shared_expert is None) != (shared is None) or layer.shared_expert_gate is not None:
        raise ValueError(f"{type(block).__name__} needs {'an ungated' if shared is not None else 'no'} shared expert")
    _export_fused(layer, block)
    if shared is not None:
        _set_hf_mlp(shared, layer.shared_expert)


def _export_deepseek_v3(layer: MoE, block: nn.Module) -> None:
    if layer.router.expert_bias_E is None:
        raise ValueError(f"{type(block).__name__} needs expert_bias=True (e_score_correction_bias)")
    _export_with_shared(layer, block, block.shared_experts)
    block.gate.e_score_correction_bias.copy_(layer.router.expert_bias_E)


def _deepseek_v2_router(block: nn.Module) -> dict:
    g = block.gate
    if g.topk_method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"DeepSeek-V2 topk_method={g.topk_method!r} is not supported (greedy, group_limited_greedy)")
    groups = g.topk_method == "group_limited_greedy"
    return {"order": "softmax_topk", "renormalize": False, "num_expert_groups": g.num_group if groups else None,
            "topk_expert_groups": g.topk_group if groups else None, "expert_group_score": "max",
            "routed_scaling_factor": float(g.routed_scaling_factor)}  # fmt: skip


def _build_deepseek_v2(block: nn.Module, **kw) -> MoE:
    return _build_fused(block, _deepseek_v2_router, shared_expert=_hf_mlp(block.shared_experts), **kw)


def _ernie_router(block: nn.Module) -> dict:
    return {"order": "softmax_topk", "renormalize": True, "expert_bias": True}


def _build_ernie(block: nn.Module, **kw) -> MoE:
    shared = None if block.shared_experts is None else _hf_mlp(block.shared_experts)
    layer = _build_fused(block, _ernie_router, shared_expert=shared, **kw)
    with torch.no_grad():
        layer.router.expert_bias_E.copy_(block.gate.moe_statics.e_score_correction_bias.reshape(-1))
    return layer


def _export_ernie(layer: MoE, block: nn.Module) -> None:
    if layer.router.expert_bias_E is None:
        raise ValueError(f"{type(block).__name__} needs expert_bias=True (e_score_correction_bias)")
    _export_with_shared(layer, block, block.shared_experts)
    block.gate.moe_statics.e_score_correction_bias.copy_(layer.router.expert_bias_E.view(1, -1))


# DBRX


def _dbrx_router(block: nn.Module) -> dict:
    p = block.moe_normalize_expert_weights
    return {"order": "softmax_topk", "renormalize": p is not None, "renormalize_p": 1.0 if p is None else float(p),
            **_jitter(block.router.moe_jitter_eps)}  # fmt: skip


def _build_dbrx(block: nn.Module, **kw) -> MoE:
    _check_silu(block.experts.mlp.activation_fn, type(block).__name__)
    w1, w3, w2 = _dbrx(block.experts)
    gate_w = block.router.layer.weight
    E, D = gate_w.shape
    layer = _layer(D, w1.shape[1], E, block.top_k, w1, {**_dbrx_router(block), **kw.pop("router_kwargs", {})}, **kw)
    _copy_gate(layer, gate_w)
    _copy_experts(layer, w1, w3, w2)
    return layer


def _export_dbrx(layer: MoE, block: nn.Module) -> None:
    ex = layer.experts
    _check_plain_swiglu(ex, block)
    _check_no_shared(layer, block)
    block.router.layer.weight.copy_(layer.router.gate.weight)
    _set_dbrx(block.experts, ex.w1_EFD, ex.w3_EFD, ex.w2_EDF)


# GPT-OSS


def _gpt_oss_router(block: nn.Module) -> dict:
    return {"order": "topk_softmax", "gate_bias": True}


def _build_gpt_oss(block: nn.Module, **kw) -> MoE:
    ex = block.experts
    w1, w3, w2, b1, b3, b2 = _gpt_oss(ex)
    E, F_, D = w1.shape
    experts = ClampedSwiGLUExperts(D, F_, E, bias=True, limit=float(ex.limit), alpha=float(ex.alpha),
                                   device=w1.device, dtype=w1.dtype)  # fmt: skip
    router_kwargs = {"balance_loss_weight": 0.0, **_gpt_oss_router(block), **kw.pop("router_kwargs", {})}
    layer = MoE(D, None, E, block.router.top_k, experts=experts, router_kwargs=router_kwargs, device=w1.device,
                dtype=w1.dtype, **kw)  # fmt: skip
    _copy_gate(layer, block.router.weight, block.router.bias)
    _copy_experts(layer, w1, w3, w2, b1, b3, b2)
    return layer


def _export_gpt_oss(layer: MoE, block: nn.Module) -> None:
    ex = layer.experts
    if not isinstance(ex, ClampedSwiGLUExperts) or not ex.bias:
        raise ValueError(f"GptOssMLP needs clamped_swiglu experts with biases, got {ex!r}")
    if (ex.limit, ex.alpha) != (float(block.experts.limit), float(block.experts.alpha)):
        raise ValueError(
            f"experts have limit={ex.limit}, alpha={ex.alpha}; the block {block.experts.limit}, {block.experts.alpha}"
        )
    gate = layer.router.gate
    if not isinstance(gate, nn.Linear) or gate.bias is None:
        raise ValueError("GptOssMLP's router has a bias: the layer's gate needs gate_bias=True")
    _check_no_shared(layer, block)
    block.router.weight.copy_(gate.weight)
    block.router.bias.copy_(gate.bias)
    _set_gpt_oss(block.experts, ex)


# Llama-4


def _llama4_router(block: nn.Module) -> dict:
    return {"score_fn": "sigmoid"}


def _llama4_layer(block: nn.Module) -> dict:
    return {"weight_inputs": True}


def _build_llama4(block: nn.Module, **kw) -> MoE:
    _check_silu(block.experts.act_fn, type(block).__name__)
    w1, w3, w2 = _transposed_chunked(block.experts)
    E, F_, D = w1.shape
    router_kwargs = {**_llama4_router(block), **kw.pop("router_kwargs", {})}
    layer = _layer(D, F_, E, block.top_k, w1, router_kwargs, shared_expert=_hf_mlp(block.shared_expert),
                   **_llama4_layer(block), **kw)  # fmt: skip
    _copy_gate(layer, block.router.weight)
    _copy_experts(layer, w1, w3, w2)
    return layer


def _export_llama4(layer: MoE, block: nn.Module) -> None:
    ex = layer.experts
    _check_plain_swiglu(ex, block)
    _export_with_shared_check(layer, block)
    block.router.weight.copy_(layer.router.gate.weight)
    _set_transposed_chunked(block.experts, ex.w1_EFD, ex.w3_EFD, ex.w2_EDF)
    _set_hf_mlp(block.shared_expert, layer.shared_expert)


def _export_with_shared_check(layer: MoE, block: nn.Module) -> None:
    if layer.shared_expert is None or layer.shared_expert_gate is not None:
        raise ValueError(f"{type(block).__name__} needs an ungated shared expert")


# Switch Transformers / NLLB-MoE: absolute capacity, one nn.Linear pair per expert


def _switch_router(block: nn.Module) -> dict:
    r = block.router
    return {"order": "softmax_topk", "expert_capacity": int(r.expert_capacity),
            "gate_bias": r.classifier.bias is not None, **_jitter(r.jitter_noise)}  # fmt: skip


def _switch_layer(block: nn.Module) -> dict:
    return {"group_mode": "sequence"}  # HF drops by position within each sequence


def _relu_experts(act: nn.Module, where: str) -> None:
    if not isinstance(act, nn.ReLU) and _act_name(act) != "ReLU":
        raise ValueError(f"{where} uses activation {_act_name(act)}; only ReLU experts are converted")


def _build_switch(block: nn.Module, **kw) -> MoE:
    r = block.router
    w1, w2, b1, b2 = _module_dict(("wi", "wo"))(block.experts)
    _relu_experts(block.experts["expert_0"].act, type(block).__name__)
    E, F_, D = w1.shape
    router_kwargs = {**_switch_router(block), **kw.pop("router_kwargs", {})}
    layer = _layer(D, F_, E, 1, w1, router_kwargs, experts="relu", expert_bias=b1 is not None,
                   **_switch_layer(block), **kw)  # fmt: skip
    _copy_gate(layer, r.classifier.weight, r.classifier.bias)
    _copy_experts(layer, w1, None, w2, b1, None, b2)
    return layer


def _export_linear_pairs(layer: MoE, block: nn.Module, names: tuple[str, str], classifier: nn.Linear) -> None:
    ex = layer.experts
    block_bias = getattr(block.experts["expert_0"], names[0]).bias is not None
    if type(ex).__name__ != "ReLUExperts" or ex.bias != block_bias:
        raise ValueError(f"{type(block).__name__} needs ReLU experts with the block's biases, got {ex!r}")
    _check_no_shared(layer, block)
    gate = layer.router.gate
    if (gate.bias is None) != (classifier.bias is None):
        raise ValueError(f"{type(block).__name__}'s router {'has' if classifier.bias is not None else 'has no'} bias")
    classifier.weight.copy_(gate.weight)
    if classifier.bias is not None:
        classifier.bias.copy_(gate.bias)
    _set_module_dict(names, block.experts, ex)


def _nllb_router(block: nn.Module) -> dict:
    r = block.router
    return {"order": "softmax_topk", "expert_capacity": int(r.expert_capacity),
            "renormalize": bool(r.normalize_router_prob_before_dropping),
            "batch_priority": bool(r.batch_prioritized_routing),
            "gate_bias": r.classifier.bias is not None}  # fmt: skip


def _nllb_layer(block: nn.Module) -> dict:
    # the two weights renormalised either before dropping (and not after) or after dropping only
    return {"normalize_weights": not block.router.normalize_router_prob_before_dropping}


def _build_nllb(block: nn.Module, **kw) -> MoE:
    r = block.router
    if r.second_expert_policy != "all":
        raise ValueError(f"NLLB-MoE second_expert_policy={r.second_expert_policy!r}: only 'all' is deterministic")
    if r.moe_eval_capacity_token_fraction > 0:
        raise ValueError(
            f"NLLB-MoE moe_eval_capacity_token_fraction={r.moe_eval_capacity_token_fraction} makes the evaluation "
            "capacity depend on the batch size; set it to -1 (capacity = expert_capacity) to convert"
        )
    w1, w2, b1, b2 = _module_dict(("fc1", "fc2"))(block.experts)
    _relu_experts(block.experts["expert_0"].act, type(block).__name__)
    E, F_, D = w1.shape
    router_kwargs = {**_nllb_router(block), **kw.pop("router_kwargs", {})}
    layer = _layer(D, F_, E, 2, w1, router_kwargs, experts="relu", expert_bias=b1 is not None,
                   **_nllb_layer(block), **kw)  # fmt: skip
    _copy_gate(layer, r.classifier.weight, r.classifier.bias)
    _copy_experts(layer, w1, None, w2, b1, None, b2)
    return layer


FAMILIES: tuple[HFFamily, ...] = (
    HFFamily("mixtral", ("MixtralSparseMoeBlock",), _build_mixtral, _export_plain, _topk_softmax_router),
    HFFamily("granitemoe", ("GraniteMoeMoE",), _build_mixtral, _export_plain, _topk_softmax_router),
    HFFamily("olmoe", ("OlmoeSparseMoeBlock",), _build_softmax_topk, _export_plain, _softmax_topk_router),
    HFFamily("qwen3_moe", ("Qwen3MoeSparseMoeBlock",), _build_softmax_topk, _export_plain, _softmax_topk_router),
    HFFamily("dbrx", ("DbrxFFN",), _build_dbrx, _export_dbrx, _dbrx_router, top_k=lambda block: int(block.top_k)),
    HFFamily(
        "qwen2_moe",
        ("Qwen2MoeSparseMoeBlock", "Qwen3NextSparseMoeBlock"),
        _build_qwen2,
        _export_qwen2,
        _softmax_topk_router,
    ),
    HFFamily("deepseek_v3", ("DeepseekV3MoE",), _build_deepseek_v3, _export_deepseek_v3, _deepseek_v3_router),
    HFFamily(
        "deepseek_v2",
        ("DeepseekV2Moe",),
        _build_deepseek_v2,
        lambda layer, block: _export_with_shared(layer, block, block.shared_experts),
        _deepseek_v2_router,
    ),
    HFFamily("ernie4_5_moe", ("Ernie4_5_MoeSparseMoeBlock",), _build_ernie, _export_ernie, _ernie_router),
    HFFamily(
        "switch_transformers",
        ("SwitchTransformersSparseMLP",),
        _build_switch,
        lambda layer, block: _export_linear_pairs(layer, block, ("wi", "wo"), block.router.classifier),
        _switch_router,
        top_k=lambda block: 1,
        layer=_switch_layer,
    ),
    HFFamily("gpt_oss", ("GptOssMLP",), _build_gpt_oss, _export_gpt_oss, _gpt_oss_router, returns="tuple"),
    HFFamily(
        "llama4",
        ("Llama4TextMoe",),
        _build_llama4,
        _export_llama4,
        _llama4_router,
        top_k=lambda block: int(block.top_k),
        returns="tuple",
        layer=_llama4_layer,
    ),
    HFFamily(
        "nllb_moe",
        ("NllbMoeSparseMLP",),
        _build_nllb,
        lambda layer, block: _export_linear_pairs(layer, block, ("fc1", "fc2"), block.router.classifier),
        _nllb_router,
        top_k=lambda block: 2,
        layer=_nllb_layer,
    ),
)

_BY_CLASS = {cls: fam for fam in FAMILIES for cls in fam.block_classes}


def supported_block_classes() -> list[str]:
    """The Hugging Face block class names :func:`from_hf` converts, sorted."""
    return sorted(_BY_CLASS)


def family_of(block: nn.Module) -> HFFamily:
    """The converter of ``block``'s class; ``ValueError`` naming the class and the supported ones otherwise."""
    name = type(block).__name__
    try:
        return _BY_CLASS[name]
    except KeyError:
        raise ValueError(
            f"no smoe converter for the Hugging Face block class {name!r}; supported: {supported_block_classes()}"
        ) from None


def from_hf(block: nn.Module, **moe_kwargs) -> MoE:
    """An :class:`smoe.MoE` that computes what the Hugging Face MoE ``block`` computes, with copies of its weights.

    Args:
        block: a block of a supported class (:func:`supported_block_classes`), e.g. ``OlmoeSparseMoeBlock``.
        moe_kwargs: further :class:`smoe.MoE` options (``backend``, ``dispatcher``, ...); ``router_kwargs`` are
            merged over the family's (e.g. ``{"balance_loss_weight": 0.01 * K}`` to train with HF's aux loss).

    Returns:
        The layer, in the block's dtype and device, in the block's train/eval mode.
    """
    family = family_of(block)
    layer = family.build(block, **moe_kwargs)
    return layer.train(block.training)


def to_hf(layer: MoE, block: nn.Module) -> nn.Module:
    """Copy ``layer``'s weights into ``block`` (a Hugging Face MoE block of a supported family), in place.

    Raises ``ValueError`` -- before anything is copied -- when the layer's routing, experts or shared expert are
    not what the block computes (e.g. after a router swap), naming each difference.

    Returns:
        ``block``.
    """
    family = family_of(block)
    _check_layer(layer, family, block)
    with torch.no_grad():
        family.export(layer, block)
    return block
