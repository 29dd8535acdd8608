"""The router contract: what every router takes and returns.

A router is a small ``nn.Module`` that owns its parameters (gate weights, bias buffers) around a pure function
that turns scores into a :mod:`~smoe.routing.plan`. It never touches expert weights and never moves data.

Shape legend: ``T`` tokens (in routing-group order), ``D`` width, ``E`` experts, ``K`` top-k, ``G`` groups of
``S`` tokens (``T = G*S``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe.routing.options import CAPACITY_FACTOR, check_option, integer, router_options
from smoe.routing.plan import RoutingPlan

__all__ = ["Router", "RouterOutput", "RoutingContext", "router_logits_fp32"]


@dataclass(frozen=True, kw_only=True)
class RoutingContext:
    """Side information a router may use; the MoE layer fills it, routers read what they need.

    Attributes:
        group_size: ``S``; tokens compete for capacity only inside contiguous groups of ``S`` tokens.
        token_ids_T: ``(T,)`` int64 input token ids in routing order (hash routing), or ``None``.
        attn_probs: attention probabilities handed over from the preceding attention layer, ``(B, H, L, L)``
            or ``(B, L, L)`` in the model's own (batch, position) order, or ``None``.
        batch_shape: ``(B, L)`` of the layer input when it was 3-d, else ``(1, T)``.
        group_mode: how the layer formed the groups: ``"batch"``, ``"sequence"``, ``"position"`` or ``"size"``.
        extra: further side information by name, for routers outside this package (nothing here reads it).
    """

    group_size: int
    token_ids_T: Tensor | None = None
    attn_probs: Tensor | None = None
    batch_shape: tuple[int, int] = (1, 1)
    group_mode: str = "batch"
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RouterOutput:
    """What a router returns.

    Attributes:
        plan: the routing plan (sparse or dense).
        losses: unweighted auxiliary losses by name, scalar tensors (e.g. ``"balance"``, ``"z"``).
        loss: weighted sum of the auxiliary losses, a scalar tensor (zero when none applies).
        probs_TE: ``(T, E)`` router probabilities for diagnostics (entropy), or ``None``.
        inputs_RD: rows the engine should read instead of the layer input (``R != T`` for routers that add
            rows, e.g. S2MoE's noisy copy); ``None`` means the layer input.
        stats: extra router-specific statistics (tensors).
    """

    plan: RoutingPlan
    losses: dict[str, Tensor]
    loss: Tensor
    probs_TE: Tensor | None = None
    inputs_RD: Tensor | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)


def router_logits_fp32(x_TD: Tensor, weight_ED: Tensor, bias_E: Tensor | None = None) -> Tensor:
    """Router logits in float32 whatever the autocast state (selective precision, Switch Transformer §2.4)."""
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        return F.linear(x_TD.float(), weight_ED.float(), None if bias_E is None else bias_E.float())


class Router(nn.Module):
    """Base class of all routers. A router *declares* what it needs and what it allows; layers and models read
    these declarations, never a registry name or ``hasattr``.

    Declarations (class attributes, or properties where they depend on the options):

    * ``couples_tokens``: whether a token's routing depends on other tokens of its group. Coupling routers leak
      information across positions of an autoregressive model unless groups hold one token per sequence
      (``group_mode="position"``); the MoE layer refuses such a causal configuration unless the user opts in.
    * ``plan_kind``: the plan form the router returns, ``"sparse"`` or ``"dense"``.
    * ``differentiable``: whether it has parameters the task loss trains.
    * ``needs_token_ids`` / ``needs_attention_probs``: the side inputs it reads from :class:`RoutingContext`
      (``MoE.forward(x, token_ids=..., attn_probs=...)``); a transformer block computes the attention
      probabilities only for a router that declares it needs them.
    * ``capacity_options``: which of ``"capacity_factor"`` and ``"batch_priority"`` may change after construction
      (:meth:`set_capacity`: the MoE layer's evaluation capacity, V-MoE §3.1.3); empty for routers without a
      per-expert capacity.
    * :meth:`experts_per_token` and :meth:`extra_flops_per_token`: the compute one token costs, for the accounting.
    """

    couples_tokens: ClassVar[bool] = False
    plan_kind: ClassVar[str] = "sparse"
    #: whether the router has parameters that receive gradients from the task loss
    differentiable: ClassVar[bool] = True
    #: reads ``ctx.token_ids_T`` (hash routing)
    needs_token_ids: ClassVar[bool] = False
    #: reads ``ctx.attn_probs`` (attention-aware routing)
    needs_attention_probs: ClassVar[bool] = False
    #: options :meth:`set_capacity` may change
    capacity_options: ClassVar[frozenset[str]] = frozenset()
    #: registry name (set by :func:`~smoe.routing.registry.register_router`; ``None`` for unregistered routers)
    registry_name: ClassVar[str | None] = None
    #: the capacity factor in force (``None``: dropless, or a router without per-expert capacity)
    capacity_factor: float | None = None
    #: Batch Prioritized Routing in force (routers with ``"batch_priority"`` in ``capacity_options``)
    batch_priority: bool = False

    #: the options of this class's constructor and what they accept (:mod:`smoe.routing.options`); merged with
    #: the bases' and checked before every subclass constructor runs
    OPTIONS: ClassVar[dict] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_checks_options", False):
            return
        signature = inspect.signature(init)
        var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

        @functools.wraps(init)
        def checked_init(self, *args, **kw):
            specs = router_options(type(self))
            try:
                bound = signature.bind_partial(self, *args, **kw).arguments
            except TypeError:
                bound = dict(kw)
            given = {k: v for k, v in bound.items() if k != "self"}
            given.update(given.pop(var_kw, None) or {})  # options passed on to a base class are checked too
            name = type(self).registry_name or type(self).__name__
            for option, value in given.items():
                if option in specs:
                    check_option(name, option, value, specs[option])
            init(self, *args, **kw)

        checked_init._checks_options = True
        cls.__init__ = checked_init

    OPTIONS = {
        "dim": integer(ge=1),
        "num_experts": integer(ge=1),
        "top_k": integer(ge=1),
        "capacity_factor": CAPACITY_FACTOR,
    }

    def __init__(self, *, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = top_k

    @property
    def name(self) -> str:
        """The registry name, or the class name of an unregistered router (for messages)."""
        return self.registry_name or type(self).__name__

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def experts_per_token(self, group_size: int | None = None) -> float:
        """Nominal experts one token uses (``top_k`` unless the router says otherwise).

        Args:
            group_size: tokens per routing group when the model's shapes fix it (``None`` otherwise); routers whose
                compute per token depends on it (Soft MoE's slots) read it.
        """
        return float(self.top_k)

    def extra_flops_per_token(self) -> float:
        """Forward FLOPs per token the routing adds beyond its gate's matrix product (Soft MoE's slot mixing)."""
        return 0.0

    def get_capacity(self) -> tuple[float | None, bool | None]:
        """``(capacity_factor, batch_priority)`` in force; ``None`` for an option the router does not declare."""
        cf = self.capacity_factor if "capacity_factor" in self.capacity_options else None
        bp = self.batch_priority if "batch_priority" in self.capacity_options else None
        return cf, bp

    def set_capacity(self, capacity_factor: float | None, batch_priority: bool | None = None) -> None:
        """Change the capacity factor (and Batch Prioritized Routing) in force, e.g. for evaluation.

        Args:
            capacity_factor: ``None`` (dropless) or a finite number ``> 0``.
            batch_priority: BPR on or off (``None`` keeps it); on only takes effect with a capacity factor.

        Raises:
            ValueError: the router does not declare the option, or a value is out of range.
        """
        if "capacity_factor" not in self.capacity_options:
            raise ValueError(f"router {self.name!r} has no capacity_factor to change at evaluation")
        if batch_priority is not None and "batch_priority" not in self.capacity_options:
            raise ValueError(f"router {self.name!r} has no batch_priority to change at evaluation")
        if not CAPACITY_FACTOR.accepts(capacity_factor):
            raise ValueError(
                f"capacity_factor must be {CAPACITY_FACTOR.describe()} (None: dropless), got {capacity_factor!r}"
            )
        self.capacity_factor = capacity_factor
        if batch_priority is not None:
            self.batch_priority = bool(batch_priority) and capacity_factor is not None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}"
