"""Sparse upcycling: turn the dense FFNs of a trained model into MoE layers whose experts start as copies of them.

Sparse Upcycling (Komatsuzaki et al., ICLR 2023, arXiv 2212.05055; reference §8.1): in every chosen block the dense
MLP is replaced by an MoE layer of ``E`` experts, each an exact copy of that MLP, behind a *fresh* router (the only
new parameters); everything else is kept. Training then continues with the dense run's hyperparameters.
:func:`upcycle` does this in place on three kinds of model:

=====================================  ======================================  ===================================
model                                  dense FFN found                         expert type
=====================================  ======================================  ===================================
smoe ``MoELM`` / ``VisionMoE``         ``block.ffn`` (:class:`smoe.MLP`)       the MLP's (``swiglu``/``gelu``/...)
Hugging Face Llama family              ``gate_proj``/``up_proj``/``down_proj``  ``swiglu`` (``silu`` checked)
(Llama, SmolLM2, Mistral, Qwen2, ...)  with ``act_fn``
Hugging Face BERT family               ``layer.intermediate.dense`` + act,     ``gelu`` with biases (exact erf
(BERT, MiniLM)                         ``layer.output.dense``                  GELU checked)
=====================================  ======================================  ===================================

For smoe models the model's ``config.moe`` is rewritten to describe the new layers (``moe.layers``), so the model
saves and rebuilds like any other smoe model. Hugging Face modules are edited in place (``generate`` and
``save_pretrained`` keep working; :mod:`smoe.interop.hf_upcycle` reloads a saved one). The BERT FFN is split over
two modules (``intermediate`` computes ``act(W1 x + b1)``, ``output`` adds ``W2 h + b2`` to the residual under its
LayerNorm): the MoE takes ``intermediate``'s place and computes the whole FFN, and ``output.dense`` becomes an
identity.

Exactness right after upcycling. Every expert computes the dense ``f``, so the layer gives
``sum_e w_e(x) f(x) = f(x)`` when each token's combine weights sum to one: the model's function is unchanged, up
to the float32 rounding of the router weights (routers compute in float32 whatever the model's dtype). Which
routers do that is measured on every registered router by ``tests/interop/test_upcycle.py`` (the table in
``docs/upcycling.md``): token choice with ``order="topk_softmax"`` or ``renormalize=True``, dropless, does; so
does any sparse router under ``normalize_weights=True``, for the tokens it routes at all. The defaults of most
routers do not: V-MoE's ``softmax_topk`` keeps ``p_1 + p_2 < 1`` and expert choice gives a token ``0..E``
experts. This is the paper's initial quality drop (§8.3).

``noise > 0`` perturbs each expert's copy independently, ``w_e = w + noise * std(w) * N(0, 1)`` per tensor (the
paper copies exactly; noise breaks the symmetry between experts at the price of exactness). Router and noise
draws come from ``seed`` and leave the global RNG untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe.experts import MLP, MLPExperts
from smoe.layers.moe import MoE, MoEAux
from smoe.routing.registry import build_router

__all__ = ["upcycle", "Upcycled", "UpcycledFFN", "upcycled_aux_loss", "dense_ffn_sites", "LAYER_CHOICES"]

LAYER_CHOICES = ("every_other", "all")

# the weight roles of an MLP ``w2 act(w1 x + b1, w3 x + b3) + b2`` -> the stacked expert parameter of each
_EXPERT_PARAM = {"w1": "w1_EFD", "w3": "w3_EFD", "w2": "w2_EDF", "b1": "b1_EF", "b3": "b3_EF", "b2": "b2_ED"}


class UpcycledFFN(nn.Module):
    """An :class:`smoe.MoE` standing in for a Hugging Face FFN module: ``forward(x) -> y`` with ``x``'s shape.

    The layer's side outputs (aux loss, routing statistics) of the latest call are kept in :attr:`aux`, since the
    Hugging Face module that calls this one expects a tensor back; :func:`upcycled_aux_loss` sums them over a
    model after a forward pass.
    """

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe
        self.aux: MoEAux | None = None

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y, self.aux = self.moe(x)
        return y


def upcycled_aux_loss(model: nn.Module) -> Tensor | None:
    """The weighted auxiliary losses of every :class:`UpcycledFFN` of ``model`` from its latest forward pass,
    summed (``None`` when there is none)."""
    losses = [m.aux.loss for m in model.modules() if isinstance(m, UpcycledFFN) and m.aux is not None]
    return torch.stack([loss.float() for loss in losses]).sum() if losses else None


@dataclass(frozen=True)
class Upcycled:
    """What :func:`upcycle` did.

    Attributes:
        layers: qualified names of the new :class:`smoe.MoE` modules, in depth order.
        indices: their FFN indices (0-indexed among the model's dense FFN sites, i.e. block indices).
        tiled: new expert parameter name -> the dense parameter it is ``E`` copies of (model-level names; the
            optimizer state of a dense checkpoint tiles along the same map).
        fresh: parameters with no dense counterpart (the routers, a shared-expert gate).
        settings: the upcycling settings, enough to rebuild the structure (:mod:`smoe.interop.hf_upcycle`).
    """

    layers: tuple[str, ...]
    indices: tuple[int, ...]
    tiled: dict[str, str] = field(default_factory=dict)
    fresh: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)


@dataclass
class _Site:
    """One dense FFN of a model: where it is, its weights by role, and how to put an MoE in its place."""

    index: int
    name: str  # qualified name of the module the MoE replaces (its parameters keep this prefix)
    kind: str  # "smoe", "llama", "bert"
    activation: str
    weights: dict[str, tuple[str, Tensor]]  # role -> (qualified parameter name, tensor)
    install: Callable[[MoE], nn.Module]  # puts the MoE in place; returns the module now at ``name``
    causal: bool
    moe_prefix: str  # prefix of the MoE's own parameters (``name`` or ``name.moe``)


def _roles(prefix: str, named: dict[str, tuple[str, nn.Linear]]) -> dict[str, tuple[str, Tensor]]:
    """``{"w1": (name, weight), "b1": (name, bias), ...}`` of linear layers given as ``role -> (attr path, linear)``."""
    out = {}
    for role, (path, lin) in named.items():
        out[f"w{role}"] = (f"{prefix}{path}.weight", lin.weight)
        if lin.bias is not None:
            out[f"b{role}"] = (f"{prefix}{path}.bias", lin.bias)
    return out


def _same_activation(act: Callable[[Tensor], Tensor], reference: Callable[[Tensor], Tensor]) -> bool:
    probe = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
    try:
        with torch.no_grad():
            return bool(torch.allclose(act(probe), reference(probe), atol=1e-9, rtol=0))
    except Exception:  # an activation that does not take a plain tensor
        return False


def dense_ffn_sites(model: nn.Module) -> list[_Site]:
    """The dense FFNs of ``model`` that :func:`upcycle` can replace, in depth order (module docstring)."""
    from smoe.models.block import Transformer  # noqa: PLC0415 - interop sits above models

    sites: list[_Site] = []
    trunks = [(n, m) for n, m in model.named_modules() if isinstance(m, Transformer)]
    if trunks:
        if len(trunks) > 1:
            raise ValueError(f"the model holds {len(trunks)} smoe trunks; upcycle one of them at a time")
        tname, trunk = trunks[0]
        causal = bool(getattr(getattr(model, "config", None), "task", None) == "lm")
        for i, block in enumerate(trunk.blocks):
            if not isinstance(block.ffn, MLP):
                continue
            ffn = block.ffn
            name = f"{tname + '.' if tname else ''}blocks.{i}.ffn"
            named = {"1": ("w1", ffn.w1), "2": ("w2", ffn.w2)}
            if ffn.w3 is not None:
                named["3"] = ("w3", ffn.w3)

            def install(moe: MoE, block=block) -> nn.Module:
                block.ffn = moe
                return moe

            sites.append(_Site(i, name, "smoe", ffn.activation, _roles(name + ".", named), install, causal, name))
        return sites
    for name, module in model.named_modules():
        if all(isinstance(getattr(module, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")):
            if not _same_activation(getattr(module, "act_fn", None), F.silu):
                raise ValueError(
                    f"{name} ({type(module).__name__}) is a gated MLP whose act_fn is not SiLU; smoe's gated "
                    "experts are SwiGLU (silu(gate) * up)"
                )
            named = {
                "1": ("gate_proj", module.gate_proj),
                "3": ("up_proj", module.up_proj),
                "2": ("down_proj", module.down_proj),
            }
            parent, attr = _parent(model, name)

            def install(moe: MoE, parent=parent, attr=attr) -> nn.Module:
                wrapper = UpcycledFFN(moe)
                setattr(parent, attr, wrapper)
                return wrapper

            sites.append(
                _Site(len(sites), name, "llama", "swiglu", _roles(name + ".", named), install, True, name + ".moe")
            )
        inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
        if isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(getattr(out, "dense", None), nn.Linear):
            act = getattr(inter, "intermediate_act_fn", None)
            if not _same_activation(act, F.gelu):
                raise ValueError(
                    f"{name}.intermediate applies {type(act).__name__}, not the exact (erf) GELU of smoe's gelu experts"
                )
            weights = _roles(f"{name}.", {"1": ("intermediate.dense", inter.dense), "2": ("output.dense", out.dense)})

            def install(moe: MoE, layer=module) -> nn.Module:
                wrapper = UpcycledFFN(moe)
                layer.intermediate = wrapper
                layer.output.dense = nn.Identity()  # the MoE computes W2 h + b2 itself
                return wrapper

            causal = bool(getattr(getattr(model, "config", None), "is_decoder", False))
            sites.append(
                _Site(
                    len(sites),
                    f"{name}.intermediate",
                    "bert",
                    "gelu",
                    weights,
                    install,
                    causal,
                    f"{name}.intermediate.moe",
                )
            )
    return sites


def _parent(model: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    path, _, attr = qualname.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _choose(layers, sites: list[_Site]) -> list[_Site]:
    n = len(sites)
    indices = [s.index for s in sites]
    if isinstance(layers, str):
        if layers == "all":
            return sites
        if layers == "every_other":  # blocks 1, 3, 5, ... (V-MoE "Every 2", the paper's half of the MLPs)
            return [s for s in sites if s.index % 2 == 1]
        raise ValueError(f"layers must be one of {LAYER_CHOICES} or a list of FFN indices, got {layers!r}")
    if not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"layers must be one of {LAYER_CHOICES} or a non-empty list of FFN indices, got {layers!r}")
    chosen = []
    by_index = {s.index: s for s in sites}
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or i not in by_index:
            raise ValueError(f"layer {i!r} is not one of the model's {n} dense FFNs (indices {indices})")
        if by_index[i] not in chosen:
            chosen.append(by_index[i])
    return sorted(chosen, key=lambda s: s.index)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def upcycle(
    model: nn.Module,
    *,
    num_experts: int,
    top_k: int = 2,
    router: str = "token_choice",
    layers: str | Sequence[int] = "every_other",
    noise: float = 0.0,
    capacity_factor: float | None = None,
    router_kwargs: dict | None = None,
    normalize_weights: bool = False,
    group_mode: str | None = None,
    group_size: int | None = None,
    allow_token_coupling: bool = False,
    seed: int = 0,
) -> Upcycled:
    """Replace dense FFNs of ``model`` by MoE layers of ``num_experts`` copies of each, in place (module docstring).

    Args:
        model: an smoe ``MoELM``/``VisionMoE``, or a Hugging Face Llama- or BERT-family model.
        num_experts: ``E`` experts per upcycled layer.
        top_k: ``K`` (expert choice: its capacity factor).
        router: a registered router name (:func:`smoe.list_routers`); it starts from its own initialisation.
        layers: ``"every_other"`` (FFNs 1, 3, 5, ...; the paper's default of half the MLPs), ``"all"``, or a list
            of 0-indexed FFN (block) indices.
        noise: relative std of the Gaussian perturbation of each expert's copy (0: exact copies).
        capacity_factor: ``None`` (dropless) or the router's capacity factor (the paper uses expert choice, C=2).
        router_kwargs: options of the router (e.g. ``{"order": "topk_softmax"}``).
        normalize_weights: renormalise each token's combine weights after routing (the paper's vision recipe).
        group_mode, group_size: routing groups (:class:`smoe.MoE`; ``None`` keeps an smoe model's configured
            groups, and ``"batch"`` elsewhere).
        allow_token_coupling: accept a router that lets tokens compete across positions of a causal model.
        seed: seeds the router initialisation and the noise.

    Returns:
        :class:`Upcycled`, naming the new layers and the parameters copied and created.

    Raises:
        ValueError: no dense FFN to upcycle, a bad option, a router the model cannot feed (token ids or attention
            probabilities inside a Hugging Face model), or an smoe model that already has MoE layers or momentum.
    """
    _positive_int("num_experts", num_experts)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in [1, num_experts={num_experts}], got {top_k!r}")
    if isinstance(noise, bool) or not isinstance(noise, int | float) or not noise >= 0 or noise == float("inf"):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    router_kwargs = dict(router_kwargs or {})
    sites = dense_ffn_sites(model)
    if not sites:
        raise ValueError(
            f"{type(model).__name__} has no dense FFN that upcycle knows (an smoe MLP block, a Llama-style "
            "gate/up/down MLP or a BERT intermediate/output pair)"
        )
    if sites[0].kind == "smoe":
        _check_smoe_model(model, getattr(model, "config", None))
    chosen = _choose(layers, sites)
    if not chosen:
        raise ValueError(
            f"layers={layers!r} selects none of the model's dense FFNs (indices {[s.index for s in sites]})"
        )
    kind = chosen[0].kind
    config = getattr(model, "config", None)
    if kind != "smoe":
        if getattr(config, "smoe_upcycle", None) is not None:
            raise ValueError(f"this {type(model).__name__} is upcycled already (config.smoe_upcycle is set)")
        probe = build_router(router, dim=8, num_experts=num_experts, top_k=top_k, **router_kwargs)
        if probe.needs_token_ids or probe.needs_attention_probs:
            what = "token ids" if probe.needs_token_ids else "attention probabilities"
            raise ValueError(
                f"router {router!r} reads the {what}, which a Hugging Face {type(model).__name__} does not hand its "
                "FFN modules; choose a router that routes on the hidden states"
            )
    settings = {
        "format": 1,
        "num_experts": num_experts,
        "top_k": top_k,
        "router": router,
        "router_kwargs": router_kwargs,
        "layers": [s.index for s in chosen],
        "capacity_factor": capacity_factor,
        "normalize_weights": bool(normalize_weights),
        "group_mode": group_mode,
        "group_size": group_size,
        "allow_token_coupling": bool(allow_token_coupling),
        "noise": float(noise),
        "seed": seed,
    }
    new_moe_cfg = _smoe_moe_config(config, settings) if kind == "smoe" else None
    tiled: dict[str, str] = {}
    fresh: list[str] = []
    built: list[tuple[_Site, MoE]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for site in chosen:
            moe = _build_layer(model, site, settings, new_moe_cfg)
            _copy_dense_into(moe, site, noise)
            built.append((site, moe))
    for site, moe in built:  # all layers were built: only now is the model changed
        site.install(moe)
        expert_names = {f"{site.moe_prefix}.experts.{n}" for n, _ in moe.experts.named_parameters()}
        for role, (dense_name, _) in site.weights.items():
            tiled[f"{site.moe_prefix}.experts.{_EXPERT_PARAM[role]}"] = dense_name
        fresh += [
            f"{site.moe_prefix}.{n}" for n, _ in moe.named_parameters() if f"{site.moe_prefix}.{n}" not in expert_names
        ]
    if kind == "smoe":
        model.config = dataclasses.replace(config, moe=new_moe_cfg)
    elif config is not None:  # recorded in config.json by save_pretrained, read back by load_upcycled
        config.smoe_upcycle = dict(settings)
    return Upcycled(
        layers=tuple(s.moe_prefix for s, _ in built),
        indices=tuple(s.index for s, _ in built),
        tiled=tiled,
        fresh=tuple(fresh),
        settings=settings,
    )


def _check_smoe_model(model: nn.Module, config) -> None:
    from smoe.models.config import LMConfig, ViTConfig  # noqa: PLC0415

    if not isinstance(config, LMConfig | ViTConfig):
        raise ValueError(
            f"upcycle needs an smoe MoELM or VisionMoE (with an LMConfig / ViTConfig), got {type(model).__name__}"
        )
    moes = [n for n, m in model.named_modules() if isinstance(m, MoE)]
    if moes:
        raise ValueError(
            f"upcycle starts from a dense model; this one has MoE layers already ({moes[:3]}), and one model "
            "config describes one kind of MoE layer"
        )
    if config.momentum.kind is not None:
        raise ValueError(
            f"momentum.kind={config.momentum.kind!r}: MomentumSMoE applies its update to MoE blocks only, so "
            "upcycling would change the dense model's function; upcycle a model without momentum"
        )


def _smoe_moe_config(config, settings: dict):
    """The smoe model's new ``MoEConfig``: the upcycling settings, the rest (routing groups, images per group) kept
    from the dense config's ``moe`` block."""
    old = config.moe
    changes = {
        "num_experts": settings["num_experts"],
        "top_k": settings["top_k"],
        "router": settings["router"],
        "router_kwargs": dict(settings["router_kwargs"]),
        "capacity_factor": settings["capacity_factor"],
        "eval_capacity_factor": None,
        "eval_batch_priority": None,
        "hidden_dim": None,  # the experts are the dense MLP: its width, activation and biases
        "expert_activation": None,
        "expert_bias": None,
        "shared_expert_hidden_dim": 0,
        "shared_expert_gate": False,
        "layers": tuple(settings["layers"]),
        "normalize_weights": settings["normalize_weights"],
        "allow_token_coupling": settings["allow_token_coupling"],
    }
    if settings["group_mode"] is not None:
        changes["group_mode"] = settings["group_mode"]
    if settings["group_size"] is not None:
        changes["group_size"] = settings["group_size"]
    return dataclasses.replace(old, **changes)


def _build_layer(model: nn.Module, site: _Site, settings: dict, moe_cfg) -> MoE:
    w1 = site.weights["w1"][1]
    dd = {"device": w1.device, "dtype": w1.dtype}
    if site.kind == "smoe":
        from smoe.models.block import build_moe_layer  # noqa: PLC0415
        from smoe.models.config import ViTConfig  # noqa: PLC0415

        c = model.config
        group_size = None
        if isinstance(c, ViTConfig) and moe_cfg.images_per_group is not None:
            group_size = moe_cfg.images_per_group * c.tokens_per_image
        return build_moe_layer(
            dim=c.dim,
            mlp_hidden_dim=c.mlp_hidden_dim,
            mlp_activation=c.mlp_activation,
            bias=c.bias,
            causal=site.causal,
            moe=moe_cfg,
            group_size=group_size,
            **dd,
        )
    hidden, dim = w1.shape
    return MoE(
        dim,
        hidden,
        settings["num_experts"],
        settings["top_k"],
        settings["router"],
        settings["capacity_factor"],
        experts=site.activation,
        expert_bias="b1" in site.weights,
        group_mode=settings["group_mode"] or "batch",
        group_size=settings["group_size"],
        causal=site.causal,
        allow_token_coupling=settings["allow_token_coupling"],
        router_kwargs=dict(settings["router_kwargs"]),
        normalize_weights=settings["normalize_weights"],
        check_inputs=False,
        **dd,
    )


@torch.no_grad()
def _copy_dense_into(moe: MoE, site: _Site, noise: float) -> None:
    experts = moe.experts
    if not isinstance(experts, MLPExperts) or experts.activation != site.activation:
        raise ValueError(f"the layer built for {site.name} does not hold {site.activation} MLP experts")
    roles = set(site.weights)
    have = {role for role, p in _EXPERT_PARAM.items() if getattr(experts, p) is not None}
    if roles != have:
        raise ValueError(f"{site.name} has weights {sorted(roles)}, the experts built for it {sorted(have)}")
    for role, (name, dense) in site.weights.items():
        target = getattr(experts, _EXPERT_PARAM[role])
        if tuple(target.shape[1:]) != tuple(dense.shape):
            raise ValueError(f"{name} has shape {tuple(dense.shape)}, expert slices {tuple(target.shape[1:])}")
        target.copy_(dense.detach().unsqueeze(0).expand_as(target))
        if noise > 0:
            scale = noise * float(dense.detach().double().std()) if dense.numel() > 1 else noise
            target.add_(torch.randn(target.shape, dtype=torch.float64).to(target) * scale)
