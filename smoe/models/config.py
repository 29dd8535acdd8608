"""Typed model configurations: one small keyword-only dataclass per concern.

A model config is one of :class:`LMConfig` (``task="lm"``), :class:`ViTConfig` (``task="vision"``) or
:class:`VAEConfig` (``task="vae"``). Each holds a :class:`MoEConfig` (which blocks are MoE and how they route) and a
:class:`MomentumConfig` (MomentumSMoE across layers). Configs are plain data: they import no model, and
:func:`smoe.models.presets.build_model` builds the model a config's ``task`` names. Configs validate themselves in
``__post_init__`` and raise ``ValueError`` naming the offending field, so that
:func:`smoe.models.presets.apply_overrides` (which rebuilds them with :func:`dataclasses.replace`) rejects bad values
before a model is built.

Which blocks are MoE (V-MoE placement, reference §3.1.5 and Soft MoE §6.2), for a trunk of ``depth`` blocks:

* ``every=n``: blocks ``range(n-1, depth, n)`` ("Every 2" = blocks 1, 3, 5, ... 0-indexed); ``every=1`` = all
  blocks; ``every=0`` = none (a dense model);
* ``last=n``: of those, only the last ``n`` (V-MoE "Last 2" = ``every=2, last=2``; Soft MoE "last 6 blocks" =
  ``every=1, last=6``);
* ``layers=[...]``: explicit 0-indexed block indices (overrides ``every`` and ``last``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from smoe.experts import ACTIVATIONS, list_experts
from smoe.layers.moe import GROUP_MODES

__all__ = [
    "MoEConfig",
    "MomentumConfig",
    "LMConfig",
    "ViTConfig",
    "VAEConfig",
    "ModelConfig",
    "CONFIG_CLASSES",
    "moe_layer_indices",
    "robust_momentum_coefficients",
]

MOMENTUM_KINDS = (None, "heavy_ball", "adam", "robust")


def _positive_int(owner: str, name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value >= 1)
    if not ok:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{owner}.{name} must be {kind} integer, got {value!r}")


def _choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {list(choices)}, got {value!r}")


@dataclass(kw_only=True)
class MoEConfig:
    """How the MoE blocks of a model are built and where they sit.

    Attributes:
        num_experts: ``E``.
        top_k: ``K`` experts per token (expert choice: the default capacity factor).
        router: a registered router name (:func:`smoe.list_routers`).
        router_kwargs: router-specific options, passed to the router's constructor.
        capacity_factor: ``None`` for dropless routing, else the training capacity factor.
        eval_capacity_factor: capacity factor used in ``eval()`` mode (V-MoE evaluates with a larger one, or with
            ``< 1`` plus BPR for adaptive compute); ``None`` keeps the training value.
        eval_batch_priority: Batch Prioritized Routing in ``eval()`` mode; ``None`` keeps the training value.
        hidden_dim: expert hidden width ``F``; ``None`` = the model's dense MLP width (V-MoE experts are the ViT MLP).
        every, last, layers: MoE placement (see the module docstring).
        shared_expert_hidden_dim: hidden width of an always-on shared expert in each MoE block (0 = none).
        shared_expert_gate: scale the shared expert by a learned sigmoid gate (Qwen2-MoE).
        group_mode: routing groups, ``"batch"``, ``"sequence"`` or ``"position"`` (see :class:`smoe.MoE`).
        group_size: contiguous routing groups of this many tokens (overrides ``group_mode``).
        images_per_group: vision only: groups of this many whole images (V-MoE uses 8), i.e.
            ``group_size = images_per_group * tokens_per_image``; BPR then competes across those images.
        allow_token_coupling: accept a router that leaks future tokens in a causal model.
        expert_activation: the expert type (:func:`smoe.list_experts`: ``"swiglu"``, ``"gelu"``, ``"relu"``);
            ``None`` = the model's MLP activation.
        expert_bias: biases on the expert projections; ``None`` = the model's MLP bias setting.
        dispatcher: how tokens move to the experts (:func:`smoe.engine.list_dispatchers`; ``"local"``).
        backend: engine backend override (``None``: the process default).
        check_inputs: validate the MoE inputs (finiteness) on every call; off by default in models, where it would
            add a host synchronisation per layer.
        normalize_weights: renormalise each token's combine weights to sum to one after routing (Sparse
            Upcycling's vision recipe; :class:`smoe.MoE`).
    """

    num_experts: int = 8
    top_k: int = 2
    router: str = "token_choice"
    router_kwargs: dict = field(default_factory=dict)
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    eval_batch_priority: bool | None = None
    hidden_dim: int | None = None
    every: int = 1
    last: int | None = None
    layers: tuple[int, ...] | None = None
    shared_expert_hidden_dim: int = 0
    shared_expert_gate: bool = False
    group_mode: str = "batch"
    group_size: int | None = None
    images_per_group: int | None = None
    allow_token_coupling: bool = False
    expert_activation: str | None = None
    expert_bias: bool | None = None
    dispatcher: str = "local"
    backend: str | None = None
    check_inputs: bool = False
    normalize_weights: bool = False

    def __post_init__(self) -> None:
        _positive_int("moe", "num_experts", self.num_experts)
        _positive_int("moe", "top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(f"moe.top_k={self.top_k} must be <= moe.num_experts={self.num_experts}")
        if not isinstance(self.router, str) or not self.router:
            raise ValueError(f"moe.router must be a registered router name, got {self.router!r}")
        if not isinstance(self.router_kwargs, dict):
            raise ValueError(f"moe.router_kwargs must be a dict, got {type(self.router_kwargs).__name__}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"moe.{name} must be None (dropless) or a number > 0, got {value!r}")
        if self.hidden_dim is not None:
            _positive_int("moe", "hidden_dim", self.hidden_dim)
        _positive_int("moe", "every", self.every, allow_zero=True)
        if self.last is not None:
            _positive_int("moe", "last", self.last)
        if self.layers is not None:
            self.layers = tuple(self.layers)
            for i in self.layers:
                _positive_int("moe", "layers[i]", i, allow_zero=True)
        _positive_int("moe", "shared_expert_hidden_dim", self.shared_expert_hidden_dim, allow_zero=True)
        _choice("moe", "group_mode", self.group_mode, GROUP_MODES)
        if self.group_size is not None:
            _positive_int("moe", "group_size", self.group_size)
        if self.images_per_group is not None:
            _positive_int("moe", "images_per_group", self.images_per_group)
        if self.expert_activation is not None:
            _choice("moe", "expert_activation", self.expert_activation, list_experts())
        if not isinstance(self.normalize_weights, bool):
            raise ValueError(f"moe.normalize_weights must be true or false, got {self.normalize_weights!r}")
        if not isinstance(self.dispatcher, str) or not self.dispatcher:
            raise ValueError(f"moe.dispatcher must be a registered dispatcher name, got {self.dispatcher!r}")


@dataclass(kw_only=True)
class MomentumConfig:
    """Momentum across MoE layers (MomentumSMoE, Teo & Nguyen, NeurIPS 2024; reference §7). See
    :mod:`smoe.models.momentum` for the exact update rules and where they differ from the authors' code.

    Attributes:
        kind: ``None`` (plain residual), ``"heavy_ball"``, ``"adam"`` (AdamSMoE) or ``"robust"``.
        mu: heavy-ball momentum ``mu`` (authors' LM default 0.7; V-MoE 0.9).
        gamma: heavy-ball step size ``gamma`` (``gamma2`` in the authors' code, 1.0).
        adam_gamma, beta1, beta2, adam_eps: AdamSMoE ``gamma1``, ``beta1``, ``beta2`` and the ``1e-8`` inside the
            square root (authors' medium LM: 1.0, 0.9, 0.999).
        adam_layers: how many leading MoE layers use the Adam update (1 in the authors' code; later layers use
            heavy ball).
        rho, kappa, lipschitz: robust momentum (Cyrus et al. 2018) parameters ``rho``, ``kappa``, ``L``
            (authors' V-MoE defaults 0.2, 1.25, 1.0).
        post_norm: a LayerNorm after every block's update (the authors' V-MoE code, §7.5-7.6); off by default so
            that ``mu=0, gamma=1`` is exactly the plain model.
    """

    kind: str | None = None
    mu: float = 0.7
    gamma: float = 1.0
    adam_gamma: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    adam_layers: int = 1
    rho: float = 0.2
    kappa: float = 1.25
    lipschitz: float = 1.0
    post_norm: bool = False

    def __post_init__(self) -> None:
        _choice("momentum", "kind", self.kind, MOMENTUM_KINDS)
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"momentum.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.adam_eps > 0:
            raise ValueError(f"momentum.adam_eps must be > 0, got {self.adam_eps!r}")
        _positive_int("momentum", "adam_layers", self.adam_layers)
        if self.kind == "robust":
            robust_momentum_coefficients(self.rho, self.kappa, self.lipschitz)  # validates


def robust_momentum_coefficients(rho: float, kappa: float, lipschitz: float = 1.0) -> tuple[float, float, float]:
    """Robust momentum coefficients (Cyrus et al. 2018), as in the authors' V-MoE code (reference §7.5, A3).

    Returns:
        ``(eps, beta, alpha)``: lookahead ``eps = rho^3 / ((kappa-1)(1-rho)^2(1+rho))``, step
        ``beta = kappa (1-rho)^2 (1+rho) / L`` and momentum ``alpha = kappa rho^3 / (kappa-1)``;
        ``(0.0417, 0.96, 0.04)`` for the defaults ``rho=0.2, kappa=1.25, L=1``.
    """
    if not 0.0 < rho < 1.0:
        raise ValueError(f"momentum.rho must be in (0, 1), got {rho!r}")
    if not kappa > 1.0:
        raise ValueError(f"momentum.kappa must be > 1 (a condition number), got {kappa!r}")
    if not lipschitz > 0:
        raise ValueError(f"momentum.lipschitz must be > 0, got {lipschitz!r}")
    eps = rho**3 / ((kappa - 1) * (1 - rho) ** 2 * (1 + rho))
    beta = kappa * (1 - rho) ** 2 * (1 + rho) / lipschitz
    alpha = kappa * rho**3 / (kappa - 1)
    return eps, beta, alpha


def moe_layer_indices(depth: int, moe: MoEConfig) -> tuple[int, ...]:
    """0-indexed blocks that hold an MoE layer (see the module docstring)."""
    if moe.layers is not None:
        bad = [i for i in moe.layers if i >= depth]
        if bad:
            raise ValueError(f"moe.layers {bad} are out of range for depth={depth}")
        return tuple(sorted(set(moe.layers)))
    if moe.every == 0:
        return ()
    idx = tuple(range(moe.every - 1, depth, moe.every))
    return idx if moe.last is None else idx[-moe.last :]


@dataclass(kw_only=True)
class _TransformerFields:
    """Fields shared by the transformer models (not a config on its own)."""

    dim: int = 64
    depth: int = 2
    num_heads: int = 2
    mlp_hidden_dim: int = 128
    mlp_activation: str = "swiglu"
    bias: bool = False
    dropout: float = 0.0
    norm_eps: float = 1e-5
    moe: MoEConfig = field(default_factory=MoEConfig)
    momentum: MomentumConfig = field(default_factory=MomentumConfig)

    def _check_transformer(self, owner: str) -> None:
        for name in ("dim", "depth", "num_heads", "mlp_hidden_dim"):
            _positive_int(owner, name, getattr(self, name))
        if self.dim % self.num_heads:
            raise ValueError(f"{owner}.dim={self.dim} must be divisible by {owner}.num_heads={self.num_heads}")
        _choice(owner, "mlp_activation", self.mlp_activation, sorted(ACTIVATIONS))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{owner}.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.moe, MoEConfig):
            raise ValueError(f"{owner}.moe must be a MoEConfig, got {type(self.moe).__name__}")
        if not isinstance(self.momentum, MomentumConfig):
            raise ValueError(f"{owner}.momentum must be a MomentumConfig, got {type(self.momentum).__name__}")
        moe_layer_indices(self.depth, self.moe)  # validates explicit layers


@dataclass(kw_only=True)
class LMConfig(_TransformerFields):
    """GPT-style decoder-only MoE language model (:class:`smoe.models.lm.MoELM`).

    Attributes:
        task: always ``"lm"``.
        vocab_size: 256 for byte-level text; the tokenizer's size for BPE (GPT-2: 50257).
        seq_len: maximum context (learned absolute position embeddings, as GPT-2).
        tie_embeddings: share the token embedding and the output projection.
        dim, depth, num_heads, mlp_hidden_dim, mlp_activation, bias, dropout, norm_eps: the transformer trunk
            (``bias`` on linear layers and LayerNorms, as GPT-2 has them).
        moe, momentum: see :class:`MoEConfig`, :class:`MomentumConfig`.
    """

    task: str = "lm"
    vocab_size: int = 256
    seq_len: int = 128
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.task != "lm":
            raise ValueError(f"LMConfig.task must be 'lm', got {self.task!r}")
        _positive_int("lm", "vocab_size", self.vocab_size)
        _positive_int("lm", "seq_len", self.seq_len)
        self._check_transformer("lm")


@dataclass(kw_only=True)
class ViTConfig(_TransformerFields):
    """Vision transformer with MoE blocks, V-MoE style (:class:`smoe.models.vit.VisionMoE`).

    Attributes:
        task: always ``"vision"``.
        image_size, in_channels, patch_size: input geometry; ``image_size`` divisible by ``patch_size``.
        num_classes: classifier outputs.
        pool: ``"cls"`` (class token, V-MoE) or ``"mean"`` (global average pooling, Soft MoE).
        mlp_activation, bias: ViT defaults ``"gelu"`` and ``True`` (the ViT MlpBlock, also the V-MoE expert).
    """

    task: str = "vision"
    image_size: int = 28
    in_channels: int = 1
    patch_size: int = 7
    num_classes: int = 10
    pool: str = "cls"
    mlp_activation: str = "gelu"
    bias: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.task != "vision":
            raise ValueError(f"ViTConfig.task must be 'vision', got {self.task!r}")
        for name in ("image_size", "in_channels", "patch_size", "num_classes"):
            _positive_int("vision", name, getattr(self, name))
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size={self.image_size} must be divisible by patch_size={self.patch_size}")
        _choice("vision", "pool", self.pool, ("cls", "mean"))
        self._check_transformer("vision")

    @property
    def tokens_per_image(self) -> int:
        """Patches per image, plus one for the class token."""
        return (self.image_size // self.patch_size) ** 2 + (1 if self.pool == "cls" else 0)


@dataclass(kw_only=True)
class VAEConfig:
    """SMoE-VAE: a shared encoder and a mixture of decoder experts (Nikolic et al., arXiv 2509.10025; §9).

    Only ``moe.num_experts`` and ``moe.top_k`` (experts used at evaluation, 1 in the paper) are read from ``moe``:
    the decoder experts (the paper's own modules, as :class:`smoe.ModuleExperts`) run behind a ``token_choice``
    router with the paper's gate MLP (see :mod:`smoe.models.vae`).

    Attributes:
        task: always ``"vae"``.
        image_size, in_channels: input geometry (``image_size`` divisible by 4; the paper uses 1x28x28).
        latent_dim: ``z`` width (32).
        encoder_channels: the three conv widths of the encoder ("medium": 32, 64, 128).
        decoder_channels: the two conv widths of each decoder expert ("lite": 8, 16).
        gate_hidden_dims: hidden widths of the gate MLP on ``z`` (64, 32).
        routing: ``"unsupervised"`` (the paper's main model) or ``"supervised"`` (gate trained on ``label % E``).
        beta: KL weight (0.01). balance_weight: ``lambda_lb`` (200). entropy_weight: ``lambda_ent`` (400).
        supervised_weight: weight of the gate cross-entropy in supervised mode (1.0; unconfirmed in the reference).
        coefficient_batch_size: the batch size at which the reference's sum-reduced coefficients hold (128); see
            :class:`smoe.models.vae.SMoEVAE` for how the loss is scaled.
    """

    task: str = "vae"
    image_size: int = 28
    in_channels: int = 1
    latent_dim: int = 32
    encoder_channels: tuple[int, ...] = (32, 64, 128)
    decoder_channels: tuple[int, ...] = (8, 16)
    gate_hidden_dims: tuple[int, ...] = (64, 32)
    routing: str = "unsupervised"
    beta: float = 0.01
    balance_weight: float = 200.0
    entropy_weight: float = 400.0
    supervised_weight: float = 1.0
    coefficient_batch_size: int = 128
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(num_experts=7, top_k=1))
    momentum: MomentumConfig = field(default_factory=MomentumConfig)

    def __post_init__(self) -> None:
        if self.task != "vae":
            raise ValueError(f"VAEConfig.task must be 'vae', got {self.task!r}")
        for name in ("image_size", "in_channels", "latent_dim", "coefficient_batch_size"):
            _positive_int("vae", name, getattr(self, name))
        if self.image_size % 4:
            raise ValueError(f"vae.image_size={self.image_size} must be divisible by 4 (two stride-2 convs)")
        self.encoder_channels = tuple(self.encoder_channels)
        self.decoder_channels = tuple(self.decoder_channels)
        self.gate_hidden_dims = tuple(self.gate_hidden_dims)
        if len(self.encoder_channels) != 3 or len(self.decoder_channels) != 2:
            raise ValueError(
                f"vae.encoder_channels needs 3 widths and vae.decoder_channels 2, got {self.encoder_channels} "
                f"and {self.decoder_channels}"
            )
        for name in ("encoder_channels", "decoder_channels", "gate_hidden_dims"):
            for c in getattr(self, name):
                _positive_int("vae", f"{name}[i]", c)
        _choice("vae", "routing", self.routing, ("unsupervised", "supervised"))
        for name in ("beta", "balance_weight", "entropy_weight", "supervised_weight"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"vae.{name} must be a finite number >= 0, got {value!r}")
        if self.momentum.kind is not None:
            raise ValueError(
                f"vae.momentum.kind must be None: momentum runs across a stack of MoE layers and the SMoE-VAE has "
                f"one, got {self.momentum.kind!r}"
            )


ModelConfig = LMConfig | ViTConfig | VAEConfig

#: task name -> config class (used by ``config_from_dict``)
CONFIG_CLASSES: dict[str, type] = {"lm": LMConfig, "vision": ViTConfig, "vae": VAEConfig}
