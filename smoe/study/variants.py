"""The routing methods a study compares, each turned into MoE-config overrides of one shared base model.

A *variant* is a router plus the options that make it a fair entry: the same experts, the same ``top_k`` (the same
active parameters), and for a causal language model a configuration that does not leak future tokens. Routers that
make tokens compete inside a group (expert choice, USMoE, capacity-limited token choice, ...) run with
``group_mode="position"`` there: tokens compete only with the other sequences' tokens at the same position
(reference: Zhou et al. 2022 note that expert choice is not causal; OLMoE issue #46).

Named variants beyond the plain registry names:

* ``token_choice``: the base preset's own token-choice router, unchanged (its losses, noise and capacity).
* ``aux_free``: top-k token choice without any balance loss, balanced by the per-expert selection bias of
  DeepSeek-V3 / Wang et al. 2024 (updated before every optimizer step by the trainer's bias hook).

Any other registered router name is accepted and built with its defaults (plus ``group_mode="position"`` when it
couples tokens and the task is causal).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from smoe.routing import build_router, get_router, list_routers
from smoe.routing.registry import router_summary

__all__ = [
    "StudyVariant",
    "NAMED_VARIANTS",
    "DEFAULT_ROUTERS",
    "resolve_variants",
    "variant_overrides",
]


@dataclass(frozen=True, kw_only=True)
class StudyVariant:
    """One leaderboard entry.

    Attributes:
        name: label in the leaderboard and the run folder name.
        router: registered router name.
        router_kwargs: router options; ``None`` keeps the base preset's options (only for its own router).
        description: one line for the report.
    """

    name: str
    router: str
    router_kwargs: dict | None = field(default_factory=dict)
    description: str = ""


NAMED_VARIANTS: dict[str, StudyVariant] = {
    "token_choice": StudyVariant(
        name="token_choice",
        router="token_choice",
        router_kwargs=None,
        description="top-k token choice as the preset defines it (Switch/GShard balance loss, or V-MoE losses)",
    ),
    "aux_free": StudyVariant(
        name="aux_free",
        router="token_choice",
        router_kwargs={"expert_bias": True, "balance_loss_weight": 0.0},
        description="top-k token choice, no balance loss, DeepSeek-V3 aux-loss-free selection bias",
    ),
}

#: the default study per task, in this order, keeping the ones that are registered (sized to fit ~10 minutes on
#: 2 CPU cores); ``random`` is the floor a learned router should beat
DEFAULT_ROUTERS = {
    "lm": ("token_choice", "expert_choice", "xmoe", "hash", "random"),
    "vision": ("token_choice", "aux_free", "expert_choice", "usmoe", "soft", "sinkhorn", "xmoe", "random"),
}


def _doc_line(name: str) -> str:
    """The router's one-line summary, for the report."""
    return f"{router_summary(name)}; registry defaults"


def resolve_variants(names: list[str] | None, task: str = "lm") -> list[StudyVariant]:
    """Variants for ``names`` (``None``: the task's :data:`DEFAULT_ROUTERS` that are registered).

    Raises:
        ValueError: an unknown name (the message lists the valid ones), a duplicate, or a router that does not
            apply to ``task``.
    """
    registered = list_routers()
    if names is None:
        names = [n for n in DEFAULT_ROUTERS[task] if n in NAMED_VARIANTS or n in registered]
    for name in names:
        router = NAMED_VARIANTS[name].router if name in NAMED_VARIANTS else name
        if task != "lm" and router in registered and get_router(router).needs_token_ids:
            raise ValueError(f"router {name!r} routes by input token id; it applies to --task lm only")
    valid = sorted(set(NAMED_VARIANTS) | set(registered))
    seen, out = set(), []
    for name in names:
        if name in seen:
            raise ValueError(f"router {name!r} is listed twice in --routers")
        seen.add(name)
        if name in NAMED_VARIANTS:
            out.append(NAMED_VARIANTS[name])
        elif name in registered:
            out.append(StudyVariant(name=name, router=name, description=_doc_line(name)))
        else:
            raise ValueError(f"unknown router {name!r}; expected one of {valid}")
    if not out:
        raise ValueError("the study needs at least one router")
    return out


def _couples_tokens(variant: StudyVariant, moe, router_kwargs: dict, capacity_factor) -> bool:
    """Whether the variant's router makes tokens compete (built once, tiny, to ask it)."""
    router = build_router(
        variant.router,
        dim=8,
        num_experts=moe.num_experts,
        top_k=moe.top_k,
        capacity_factor=capacity_factor,
        **router_kwargs,
    )
    return bool(router.couples_tokens)


def variant_overrides(variant: StudyVariant, base_config) -> dict:
    """MoE-config overrides (Python values) that turn ``base_config`` into ``variant``.

    * ``router_kwargs`` replace the preset's, except for the preset's own router with ``router_kwargs=None``;
    * a router other than the preset's runs dropless (``capacity_factor=None``): the preset's capacity is a
      setting of its token-choice router (V-MoE's cf 1.05), and without it expert choice takes its capacity factor
      from ``top_k`` -- the same number of expert evaluations per token as top-k token choice;
    * in a language model, a token-coupling router gets ``group_mode="position"`` (causal-safe);
    * Soft MoE in vision routes per image (``group_mode="sequence"``, as the paper) with
      ``num_slots = round(N * K / E)`` slots per expert for ``N`` tokens per image, so that its expert evaluations
      per image (``E * num_slots``) match top-k token choice (``N * K``) unless ``num_slots`` is given.
    """
    moe = base_config.moe
    own = variant.router_kwargs is None and variant.router == moe.router
    kwargs = dict(moe.router_kwargs) if own else dict(variant.router_kwargs or {})
    over: dict = {"moe.router": variant.router, "moe.router_kwargs": kwargs}
    capacity = moe.capacity_factor
    if variant.router != moe.router:
        capacity = None
        over["moe.capacity_factor"] = None
        over["moe.eval_capacity_factor"] = None
        over["moe.eval_batch_priority"] = None
    if base_config.task == "vision" and get_router(variant.router).plan_kind == "dense":
        over["moe.images_per_group"] = None
        over["moe.group_mode"] = "sequence"
        if "num_slots" not in kwargs:
            kwargs["num_slots"] = max(1, round(base_config.tokens_per_image * moe.top_k / moe.num_experts))
    if base_config.task == "lm" and moe.group_size is None:
        if _couples_tokens(variant, moe, kwargs, capacity):
            over["moe.group_mode"] = "position"
    return over
