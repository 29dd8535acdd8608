"""The MoE layer: router -> routing plan -> dispatch -> experts -> combine (+ shared expert).

``y, aux = MoE(...)(x)``: ``x`` is ``(T, D)`` or ``(B, L, D)``; ``y`` has the same leading shape and the experts'
output width (``D`` for MLP experts); ``aux.loss`` is the weighted auxiliary loss (a scalar tensor, zero when none
applies); ``aux.losses`` the unweighted losses by name; ``aux.stats`` routing statistics as tensors; ``aux.plan`` the
routing plan and ``aux.probs_TE`` the router probabilities (for diagnostics and model-level losses). Losses are
returned values, never globals.

The layer composes three parts, each given by a registered name or as an instance:

* ``router=`` -- who goes where (:mod:`smoe.routing`, ``smoe.list_routers()``);
* ``experts=`` -- what each expert computes (:mod:`smoe.experts`, ``smoe.list_experts()``; any ``nn.Module`` per
  expert through :class:`~smoe.experts.module.ModuleExperts`);
* ``dispatcher=`` -- how tokens move to the experts and back (:mod:`smoe.engine.dispatcher`, ``"local"``).

Routing groups. Routers that make tokens compete (capacity, BPR, expert choice, Soft MoE, ...) do so inside
*groups* (vmoe routes per group, reference §1.1). ``group_mode`` decides them for a ``(B, L, D)`` input:

* ``"batch"`` -- one group of all ``B*L`` tokens (the default);
* ``"sequence"`` -- one group per sequence (Soft MoE / expert choice per image);
* ``"position"`` -- one group per position, holding the ``B`` tokens at that position: tokens compete only
  across the batch, never within a sequence, so no information flows from later positions to earlier ones.
  This is the causal-safe mode for coupling routers.
* an ``int`` ``group_size`` -- contiguous groups of that many tokens (V-MoE: 8 images per group).

A layer built with ``causal=True`` and a token-coupling router refuses any mode but ``"position"`` unless
``allow_token_coupling=True``.

Evaluation capacity (V-MoE, Riquelme et al. 2021 §3.1.3; reference §3.1.3): :meth:`MoE.set_eval_capacity` gives the
router another capacity factor (and Batch Prioritized Routing setting) in ``eval()`` mode, e.g. ``cf < 1`` with BPR
for adaptive compute; ``train()`` restores the training capacity. Only routers that declare the option
(``Router.capacity_options``) accept it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from smoe.engine import run_plan
from smoe.engine.backend import resolve_backend
from smoe.engine.dispatcher import Dispatcher, build_dispatcher
from smoe.experts import MLP, Experts, MLPExperts, build_experts
from smoe.routing.base import Router, RoutingContext
from smoe.routing.options import CAPACITY_FACTOR
from smoe.routing.plan import DensePlan, SparsePlan
from smoe.routing.registry import build_router

__all__ = ["MoE", "MoEAux", "GROUP_MODES", "DTypeMismatchError"]

GROUP_MODES = ("batch", "sequence", "position")


@dataclass(frozen=True, kw_only=True)
class MoEAux:
    """Side outputs of one MoE layer call.

    Attributes:
        loss: weighted auxiliary loss, scalar tensor.
        losses: unweighted losses by name.
        stats: routing statistics (tensors): ``tokens_per_expert`` ``(E,)``, ``drop_rate``, ``unrouted_fraction``,
            ``router_entropy`` (mean per-token entropy of the router probabilities, nats), ``tokens_processed``.
            With a dispatcher that shards the experts over processes, ``tokens_per_expert`` is summed over them
            (the experts' real load) and ``tokens_per_expert_local`` is this process's share; the others are
            this process's.
        plan: the routing plan of this call.
        probs_TE: ``(T, E)`` router probabilities in routing order (differentiable), or ``None`` when the router
            gives none.
    """

    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)
    plan: SparsePlan | DensePlan | None = None
    probs_TE: Tensor | None = None


def _routing_stats(plan, probs_TE: Tensor | None, num_tokens: int) -> dict[str, Tensor]:
    """Statistics computed from the plan alone (no gradients)."""
    with torch.no_grad():
        stats: dict[str, Tensor] = {}
        if isinstance(plan, SparsePlan):
            stats["tokens_per_expert"] = plan.counts_E.detach()
            requested = max(plan.num_requested, 1)
            device = plan.counts_E.device
            stats["drop_rate"] = torch.tensor(1.0 - plan.num_rows / requested, device=device).clamp_min(0.0)
            routed_T = torch.bincount(plan.token_idx_N, minlength=num_tokens) > 0
            stats["unrouted_fraction"] = 1.0 - routed_T.float().mean()
            stats["tokens_processed"] = routed_T.sum()
        else:
            G, S, E, C = plan.dispatch_GSEC.shape
            stats["tokens_per_expert"] = torch.full((E,), G * C, device=plan.dispatch_GSEC.device)
            stats["drop_rate"] = plan.dispatch_GSEC.new_zeros(())
            stats["unrouted_fraction"] = plan.dispatch_GSEC.new_zeros(())
            stats["tokens_processed"] = torch.tensor(num_tokens, device=plan.dispatch_GSEC.device)
        if probs_TE is not None:
            p = probs_TE.detach().float()
            stats["router_entropy"] = -(p * p.clamp_min(1e-20).log()).sum(-1).mean()
        return stats


def _normalized(plan: SparsePlan) -> SparsePlan:
    """``plan`` with each token's combine weights divided by their sum (``normalize_weights``)."""
    sum_T = plan.weight_N.new_zeros(plan.num_tokens).index_add(0, plan.token_idx_N, plan.weight_N)
    # a token's weights are non-negative; a zero sum (all weights zero) stays zero instead of 0/0
    denom_N = sum_T.index_select(0, plan.token_idx_N)
    weight_N = plan.weight_N / torch.where(denom_N > 0, denom_N, torch.ones_like(denom_N))
    return dataclasses.replace(plan, weight_N=weight_N)


def _weighted_rows(x_RD: Tensor, plan: SparsePlan) -> tuple[Tensor, SparsePlan]:
    """``(x_ND, plan')``: row ``n`` is ``weight_N[n] * x[gather_idx_N[n]]`` and ``plan'`` reads row ``n`` with
    weight 1 (``weight_inputs``: the combine weight moved to the expert's input)."""
    weight_N = plan.weight_N.to(x_RD.dtype)
    x_ND = x_RD.index_select(0, plan.gather_idx_N) * weight_N.unsqueeze(-1)
    source_idx_N = torch.arange(plan.num_rows, device=x_RD.device)
    return x_ND, dataclasses.replace(plan, weight_N=torch.ones_like(weight_N), source_idx_N=source_idx_N)


class DTypeMismatchError(ValueError, RuntimeError):
    """The input's dtype does not fit the layer's parameters. A ``ValueError`` (bad input) that is also the
    ``RuntimeError`` ``nn.Linear`` raises in the same case, so code written for either catches it."""


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class MoE(nn.Module):
    """Sparse Mixture-of-Experts layer (module docstring).

    Args:
        dim: model width ``D`` (the width of the rows the experts take).
        hidden_dim: expert hidden width ``F`` for experts built by name; may be ``None`` with an ``experts``
            instance.
        num_experts: ``E``.
        top_k: experts per token ``K`` (for expert choice: the default capacity factor).
        router: a registered router name (:func:`smoe.list_routers`) or a :class:`~smoe.routing.Router`.
        capacity_factor: ``None`` for dropless routing, else the capacity factor (> 0).
        experts: a registered expert type (:func:`smoe.list_experts`; default ``"swiglu"``) or an
            :class:`~smoe.experts.Experts` instance.
        dispatcher: a registered dispatcher name (default ``"local"``) or a
            :class:`~smoe.engine.dispatcher.Dispatcher` instance.
        expert: the older spelling of ``experts=`` for a name (``"swiglu"``, ``"gelu"``, ``"relu"``).
        expert_bias: biases on the expert projections (experts built by name).
        expert_kwargs: further options of the expert type built by name.
        shared_expert_hidden_dim: hidden width of an always-on shared expert, a dense MLP of the experts'
            activation (0 = none; DeepSeekMoE / Qwen2-MoE).
        shared_expert_gate: scale the shared expert's output by a learned ``sigmoid(x W_g)``, ``W_g`` of shape
            ``(1, D)`` (Qwen2-MoE's ``shared_expert_gate``).
        shared_expert: a shared expert module instead of ``shared_expert_hidden_dim``.
        group_mode: ``"batch"``, ``"sequence"``, ``"position"`` (module docstring).
        group_size: contiguous routing groups of this many tokens (overrides ``group_mode``).
        causal: the layer sits in an autoregressive model; coupling routers must not leak across positions.
        allow_token_coupling: opt in to a leaking configuration in a causal model.
        backend: engine backend override (``None``: process default; see :mod:`smoe.engine.backend`).
        router_kwargs: extra router-specific options (routers built by name).
        check_inputs: validate the input (shape, finiteness) on every call.
        normalize_weights: after routing (and capacity dropping), divide each token's combine weights by their
            sum over the experts that took it, so that they sum to one ("normalize weights after routing", Sparse
            Upcycling, Komatsuzaki et al. 2023, §3.1, vision). A token no expert took keeps an output of zero.
            Sparse plans only (a Soft MoE router is refused).
        weight_inputs: apply each assignment's combine weight to the expert's *input* instead of its output,
            ``y = sum_e f_e(w_e x)`` rather than ``sum_e w_e f_e(x)`` (Llama-4's ``Llama4TextMoe``, whose top-1
            sigmoid score scales the token before the expert). The same for a linear expert only. Sparse plans
            only.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None,
        num_experts: int,
        top_k: int = 2,
        router: str | Router = "token_choice",
        capacity_factor: float | None = None,
        *,
        experts: str | Experts | None = None,
        dispatcher: str | Dispatcher = "local",
        expert: str | None = None,
        expert_bias: bool = False,
        expert_kwargs: dict | None = None,
        shared_expert_hidden_dim: int = 0,
        shared_expert_gate: bool = False,
        shared_expert: nn.Module | None = None,
        group_mode: str = "batch",
        group_size: int | None = None,
        causal: bool = False,
        allow_token_coupling: bool = False,
        backend: str | None = None,
        router_kwargs: dict | None = None,
        check_inputs: bool = True,
        normalize_weights: bool = False,
        weight_inputs: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _positive_int("dim", dim)
        if not isinstance(normalize_weights, bool):
            raise ValueError(f"normalize_weights must be True or False, got {normalize_weights!r}")
        _positive_int("num_experts", num_experts)
        if hidden_dim is not None or not isinstance(experts, Experts):
            _positive_int("hidden_dim", hidden_dim)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an integer in [1, num_experts={num_experts}], got {top_k!r}")
        if not CAPACITY_FACTOR.accepts(capacity_factor):
            raise ValueError(
                f"capacity_factor must be {CAPACITY_FACTOR.describe()} (None: dropless), got {capacity_factor!r}"
            )
        if group_mode not in GROUP_MODES:
            raise ValueError(f"group_mode must be one of {GROUP_MODES}, got {group_mode!r}")
        if group_size is not None and (
            isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
        ):
            raise ValueError(f"group_size must be None or a positive integer, got {group_size!r}")
        if (
            isinstance(shared_expert_hidden_dim, bool)
            or not isinstance(shared_expert_hidden_dim, int)
            or shared_expert_hidden_dim < 0
        ):
            raise ValueError(f"shared_expert_hidden_dim must be an integer >= 0, got {shared_expert_hidden_dim!r}")
        if shared_expert is not None and shared_expert_hidden_dim:
            raise ValueError("give shared_expert= or shared_expert_hidden_dim=, not both")
        if backend is not None:
            resolve_backend(backend)  # validates the name
        self.dim, self.hidden_dim, self.num_experts, self.top_k = dim, hidden_dim, num_experts, top_k
        self.group_mode, self.group_size = group_mode, group_size
        self.causal, self.allow_token_coupling = causal, allow_token_coupling
        self.backend, self.check_inputs = backend, check_inputs
        dd = {"device": device, "dtype": dtype}

        # 1. the router (it routes over all experts)
        if isinstance(router, Router):
            if capacity_factor is not None or router_kwargs:
                raise ValueError("capacity_factor / router_kwargs apply to routers built by name, not to an instance")
            self.router = router
        elif isinstance(router, str):
            own = sorted(
                set(router_kwargs or {}) & {"dim", "num_experts", "top_k", "capacity_factor", "device", "dtype"}
            )
            if own:
                raise ValueError(f"router_kwargs may not hold {own[0]!r}: it is an argument of the MoE layer itself")
            self.router = build_router(
                router,
                dim=dim,
                num_experts=num_experts,
                top_k=top_k,
                capacity_factor=capacity_factor,
                **dd,
                **(router_kwargs or {}),
            )
        else:
            raise ValueError(f"router must be a registered name or a Router instance, got {type(router).__name__}")
        if self.router.num_experts != num_experts:
            raise ValueError(f"router has num_experts={self.router.num_experts}, the layer {num_experts}")
        if normalize_weights and self.router.plan_kind != "sparse":
            raise ValueError(
                f"normalize_weights=True renormalises the combine weights of a sparse plan; router "
                f"{self.router.name!r} makes a {self.router.plan_kind} plan"
            )
        self.normalize_weights = normalize_weights
        if not isinstance(weight_inputs, bool):
            raise ValueError(f"weight_inputs must be True or False, got {weight_inputs!r}")
        if weight_inputs and self.router.plan_kind != "sparse":
            raise ValueError(
                f"weight_inputs=True scales the rows of a sparse plan; router {self.router.name!r} makes a "
                f"{self.router.plan_kind} plan"
            )
        self.weight_inputs = weight_inputs

        # 2. the dispatcher (before the experts: it says how many of them live in this process)
        if isinstance(dispatcher, str):
            dispatcher = build_dispatcher(dispatcher)
        if not isinstance(dispatcher, Dispatcher):
            raise ValueError(f"dispatcher must be a registered name or a Dispatcher, got {type(dispatcher).__name__}")
        self.dispatcher = dispatcher
        local_experts = dispatcher.num_local_experts(num_experts)

        # 3. the experts (the local ones, when the dispatcher shards them)
        if experts is not None and expert is not None:
            raise ValueError(f"give experts= or its older spelling expert=, not both (got {experts!r} and {expert!r})")
        if isinstance(experts, Experts):
            if expert_kwargs or expert_bias:
                raise ValueError("expert_bias / expert_kwargs apply to experts built by name, not to an instance")
            self.experts = experts
        elif isinstance(experts, str | None):
            self.experts = build_experts(
                experts or expert or "swiglu",
                dim=dim,
                hidden_dim=hidden_dim,
                num_experts=local_experts,
                bias=expert_bias,
                **dd,
                **(expert_kwargs or {}),
            )
        else:
            raise ValueError(f"experts must be a registered name or an Experts instance, got {type(experts).__name__}")
        if self.experts.num_experts != local_experts:
            where = "" if local_experts == num_experts else f" ({local_experts} of {num_experts} in this process)"
            raise ValueError(f"experts hold num_experts={self.experts.num_experts}, the layer {local_experts}{where}")
        if self.experts.dim is not None and self.experts.dim != dim:
            raise ValueError(f"experts take rows of width {self.experts.dim}, the layer has dim={dim}")

        # 4. the shared expert (always on), optionally gated
        if shared_expert_hidden_dim:
            if not isinstance(self.experts, MLPExperts):
                raise ValueError("shared_expert_hidden_dim needs MLP experts; pass a shared_expert= module instead")
            shared_expert = MLP(
                dim, shared_expert_hidden_dim, activation=self.experts.activation, bias=self.experts.bias, **dd
            )
        self.shared_expert = shared_expert
        if shared_expert_gate and shared_expert is None:
            raise ValueError("shared_expert_gate=True needs a shared expert")
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False, **dd) if shared_expert_gate else None

        self._eval_capacity: tuple[float | None, bool | None] | None = None
        self._train_capacity: tuple[float | None, bool | None] | None = None
        self.check_causal_safety()
        self.dispatcher.check_layer(self)

    # -- expert parallelism -----------------------------------------------------------------------------------

    def shard_experts(self, dispatcher: Dispatcher) -> None:
        """Move this layer (built with all its experts in one process) onto ``dispatcher``, keeping only the
        experts it places here: the experts ``[first, first + count)`` of the full layer, with their weights.

        This is how a model built as in one process (same seed, same initialisation) is made expert-parallel
        (:func:`smoe.layers.apply_expert_parallel`); every rank then holds its slice of the one-process experts.
        """
        if not isinstance(dispatcher, Dispatcher):
            raise ValueError(f"dispatcher must be a Dispatcher, got {type(dispatcher).__name__}")
        if not self.dispatcher.local:
            raise ValueError(f"this layer's experts are sharded already ({self.dispatcher!r})")
        count = dispatcher.num_local_experts(self.num_experts)
        if count != self.num_experts:
            self.experts = self.experts.shard(dispatcher.first_local_expert(self.num_experts), count)
        self.dispatcher = dispatcher
        dispatcher.check_layer(self)

    # -- causal safety ----------------------------------------------------------------------------------------

    @property
    def leaks_across_positions(self) -> bool:
        """Whether a token's output can depend on later tokens of its own sequence."""
        return bool(self.router.couples_tokens) and (self.group_mode != "position" or self.group_size is not None)

    def check_causal_safety(self) -> None:
        """Raise ``ValueError`` for a causal layer whose router would leak future tokens (unless opted in)."""
        if self.causal and self.leaks_across_positions and not self.allow_token_coupling:
            raise ValueError(
                f"router {self.router.name!r} makes tokens compete, so in group_mode={self.group_mode!r}"
                f"{'' if self.group_size is None else f', group_size={self.group_size}'} a token's output depends on "
                "later tokens of its sequence (leakage in a causal model). Use group_mode='position' (tokens compete "
                "only across the batch at the same position) or pass allow_token_coupling=True to accept the leak."
            )

    # -- evaluation capacity ----------------------------------------------------------------------------------

    @property
    def capacity_factor(self) -> float | None:
        """The router's capacity factor in force (``None``: dropless, or a router without one)."""
        return self.router.get_capacity()[0]

    def set_eval_capacity(self, capacity_factor: float | None, batch_priority: bool | None = None) -> None:
        """Use this capacity factor (and BPR setting) in ``eval()`` mode; training keeps its own.

        Args:
            capacity_factor: ``None`` (dropless) or ``> 0``.
            batch_priority: Batch Prioritized Routing at evaluation; ``None`` keeps the training setting.

        Raises:
            ValueError: the router does not declare the option, a value is out of range, or the evaluation setting
                would make a causal layer leak (nothing is changed then).
        """
        if batch_priority and capacity_factor is None:
            raise ValueError("batch_priority=True needs a capacity_factor (BPR only decides which tokens are dropped)")
        train = self._train_capacity if self._train_capacity is not None else self.router.get_capacity()
        self.router.set_capacity(capacity_factor, batch_priority)  # validates first: nothing changes on an error
        try:
            self.check_causal_safety()  # a capacity at evaluation can make a causal layer leak: refuse it now
        finally:
            self.router.set_capacity(*train)  # training capacity until eval() applies the new one
        self._train_capacity, self._eval_capacity = train, (capacity_factor, batch_priority)
        self._apply_capacity()

    def capacity_state(self) -> tuple:
        """The evaluation-capacity state, to restore with :meth:`restore_capacity_state` (atomic model updates)."""
        return self._train_capacity, self._eval_capacity

    def restore_capacity_state(self, state: tuple) -> None:
        self.clear_eval_capacity()
        self._train_capacity, self._eval_capacity = state
        self._apply_capacity()

    def clear_eval_capacity(self) -> None:
        """Forget the evaluation capacity: both modes use the training capacity (e.g. after a router swap)."""
        if self._train_capacity is not None and "capacity_factor" in self.router.capacity_options:
            self.router.set_capacity(*self._train_capacity)
        self._train_capacity = self._eval_capacity = None

    def train(self, mode: bool = True) -> MoE:
        super().train(mode)
        self._apply_capacity()
        return self

    def _apply_capacity(self) -> None:
        if self._eval_capacity is None or self._train_capacity is None:
            return
        train_cf, train_bp = self._train_capacity
        if self.training:
            self.router.set_capacity(train_cf, train_bp)
        else:
            cf, bp = self._eval_capacity
            self.router.set_capacity(cf, train_bp if bp is None else bp)

    # -- forward ----------------------------------------------------------------------------------------------

    def _validate(self, x: Tensor) -> None:
        if x.dim() not in (2, 3):
            raise ValueError(
                f"MoE input must be (T, D) or (B, L, D), got a {x.dim()}-d tensor of shape {tuple(x.shape)}"
            )
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoE input width {x.shape[-1]} does not match dim={self.dim}")
        if x.numel() == 0:
            raise ValueError(f"MoE input is empty (shape {tuple(x.shape)}); expected at least one token")
        if not x.is_floating_point():
            raise DTypeMismatchError(f"MoE input must be a floating-point tensor, got {x.dtype}")
        param = next(self.experts.parameters(), None)
        if param is None:
            param = next(self.parameters(), None)
        if param is not None and x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            # as nn.Linear ("mat1 and mat2 must have the same dtype"), but at the layer's boundary
            raise DTypeMismatchError(
                f"MoE input dtype {x.dtype} does not match the layer's parameters ({param.dtype}); cast the input "
                f"(x.to({param.dtype})) or the layer (layer.to({x.dtype})), or run under torch.autocast"
            )
        # a NaN or Inf anywhere makes the sum non-finite, so a finite sum proves a finite input in one reduction
        # (no (T, D) bool temporary: 0.2 ms instead of 3.5 ms at 4096 x 512 fp32); a non-finite sum can also be a
        # harmless overflow, so only then is the exact elementwise check run
        if self.check_inputs and not bool(torch.isfinite(x.detach().sum())) and not bool(torch.isfinite(x).all()):
            raise ValueError("MoE input contains NaN or Inf values")

    def _group(self, x: Tensor) -> tuple[Tensor, int, tuple[int, int]]:
        """Flatten to routing-group order: returns ``(x_TD, group_size, (B, L))``."""
        B, L = (1, x.shape[0]) if x.dim() == 2 else (x.shape[0], x.shape[1])
        T = B * L
        if self.group_size is not None:
            if T % self.group_size:
                raise ValueError(f"number of tokens {T} is not divisible by group_size={self.group_size}")
            return x.reshape(T, -1), self.group_size, (B, L)
        if self.group_mode == "position":
            # (B, L, D) -> (L, B, D): the B tokens at one position form a group
            return x.reshape(B, L, -1).transpose(0, 1).reshape(T, -1), B, (B, L)
        if self.group_mode == "sequence":
            return x.reshape(T, -1), L, (B, L)
        return x.reshape(T, -1), T, (B, L)

    def routing_order(self, t: Tensor) -> Tensor:
        """``t`` (shaped like this layer's input, ``(T, ...)`` or ``(B, L, ...)`` with at least one trailing
        dimension) flattened to ``(T, ...)`` in the order the router sees the tokens: the token index of
        ``aux.plan``. For per-token side data of a call (labels, ids: add a trailing dimension of 1)."""
        return self._group(t)[0]

    def _ungroup(self, y_T: Tensor, lead: torch.Size, BL: tuple[int, int]) -> Tensor:
        """Back to the input's leading shape ``lead``; the experts' output shape trails."""
        B, L = BL
        out = y_T.shape[1:]
        if self.group_size is None and self.group_mode == "position":
            y_T = y_T.view(L, B, *out).transpose(0, 1)
        return y_T.reshape(*lead, *out)

    def forward(
        self, x: Tensor, *, token_ids: Tensor | None = None, attn_probs: Tensor | None = None
    ) -> tuple[Tensor, MoEAux]:
        """Route and run the experts.

        Args:
            x: ``(T, D)`` or ``(B, L, D)``.
            token_ids: optional input token ids, shape ``x.shape[:-1]`` (routers with ``needs_token_ids``).
            attn_probs: optional attention probabilities from the preceding attention layer (routers with
                ``needs_attention_probs``), ``(B, H, L, L)`` or ``(B, L, L)``.

        Returns:
            ``(y, aux)`` with ``y`` of shape ``(*x.shape[:-1], *out)`` (``out = (D,)`` for MLP experts).
        """
        self._validate(x)
        x_TD, S, BL = self._group(x)
        ids_T = None
        if token_ids is not None:
            if token_ids.shape != x.shape[:-1]:
                raise ValueError(
                    f"token_ids shape {tuple(token_ids.shape)} must equal x.shape[:-1]={tuple(x.shape[:-1])}"
                )
            ids_T, _, _ = self._group(token_ids.unsqueeze(-1))
            ids_T = ids_T.squeeze(-1)
        mode = "size" if self.group_size is not None else self.group_mode
        ctx = RoutingContext(group_size=S, token_ids_T=ids_T, attn_probs=attn_probs, batch_shape=BL, group_mode=mode)
        # router -> plan
        routed = self.router(x_TD, ctx)
        plan = routed.plan if not self.normalize_weights else _normalized(routed.plan)
        # dispatch -> experts -> combine (the router may add rows: S2MoE's noisy copy)
        rows_RD = x_TD if routed.inputs_RD is None else routed.inputs_RD
        run = plan
        if self.weight_inputs:  # one engine row per assignment, already scaled; combined with weight 1
            rows_RD, run = _weighted_rows(rows_RD, plan)
        y_T = run_plan(rows_RD, run, self.experts, self.backend, self.dispatcher)
        y = self._ungroup(y_T, x.shape[:-1], BL)
        # + the shared expert
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        stats = _routing_stats(routed.plan, routed.probs_TE, x_TD.shape[0])
        if not self.dispatcher.local:  # the experts' load comes from every rank's tokens
            stats["tokens_per_expert_local"] = stats["tokens_per_expert"]
            stats["tokens_per_expert"] = self.dispatcher.reduce_counts(stats["tokens_per_expert"])
        stats.update(routed.stats)
        for name, value in routed.losses.items():
            stats[f"loss_{name}"] = value.detach()
        return y, MoEAux(loss=routed.loss, losses=routed.losses, stats=stats, plan=plan, probs_TE=routed.probs_TE)

    def extra_repr(self) -> str:
        return (
            f"top_k={self.top_k}, capacity_factor={self.capacity_factor}, group_mode={self.group_mode}, "
            f"group_size={self.group_size}, causal={self.causal}, dispatcher={self.dispatcher!r}"
            + (", normalize_weights=True" if self.normalize_weights else "")
            + (", weight_inputs=True" if self.weight_inputs else "")
        )
