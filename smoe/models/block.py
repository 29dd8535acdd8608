"""The transformer block every model shares, and the trunk (a stack of blocks) that collects MoE side outputs.

Shape legend: ``B`` batch, ``L`` sequence length (tokens per image for vision), ``D`` width, ``H`` heads.

A block is pre-norm (GPT-2, ViT, V-MoE ``x + MoE(LN(x))``, reference §3.1.5)::

    h = x + drop(attn(norm1(x)))
    f = drop(ffn(norm2(h)))          # ffn is a dense smoe.MLP or an smoe.MoE (constructor injection)
    x = h + f                        # or the MomentumSMoE update (smoe.models.momentum)

When the MoE's router declares that it reads the attention probabilities (``router.needs_attention_probs``), the
block runs its attention on the manual path and hands ``probs_BHLL`` to ``moe(x, attn_probs=...)``; nothing is kept
in global state. Token ids (hash routing) are passed the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from smoe.layers import MLP, MoE, MoEAux
from smoe.models.attention import SelfAttention
from smoe.models.config import MoEConfig, MomentumConfig, moe_layer_indices
from smoe.models.momentum import Momentum, MomentumState

__all__ = ["Block", "Transformer", "build_transformer", "build_moe_layer", "sum_aux_losses", "moe_metrics"]


class Block(nn.Module):
    """Pre-norm transformer block with a dense or MoE feed-forward.

    Args:
        attn: the self-attention module.
        ffn: a dense :class:`smoe.MLP` or an :class:`smoe.MoE`.
        dim: model width ``D`` (for the norms).
        bias: LayerNorm biases.
        dropout: residual dropout on the attention and FFN outputs.
        norm_eps: LayerNorm epsilon.
        post_norm: a LayerNorm after the update (MomentumSMoE V-MoE code, reference §7.5-7.6).
    """

    def __init__(
        self,
        *,
        attn: SelfAttention,
        ffn: nn.Module,
        dim: int,
        bias: bool = False,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        post_norm: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, bias=bias, **dd)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, bias=bias, **dd)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)
        self.post_norm = nn.LayerNorm(dim, eps=norm_eps, bias=bias, **dd) if post_norm else nn.Identity()

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    @property
    def needs_attn_probs(self) -> bool:
        return self.is_moe and self.ffn.router.needs_attention_probs

    def forward(
        self,
        x_BLD: Tensor,
        *,
        token_ids_BL: Tensor | None = None,
        momentum: Momentum | None = None,
        state: MomentumState | None = None,
    ) -> tuple[Tensor, MoEAux | None]:
        """One block.

        Args:
            x_BLD: ``(B, L, D)``.
            token_ids_BL: input token ids for hash routing (MoE blocks only), or ``None``.
            momentum: the trunk's momentum rule, or ``None`` for the plain residual.
            state: the momentum state of this forward pass (required with ``momentum``).

        Returns:
            ``(x_BLD, aux)``; ``aux`` is the MoE layer's :class:`~smoe.layers.moe.MoEAux` or ``None`` (dense).
        """
        a_BLD, probs_BHLL = self.attn(self.norm1(x_BLD), need_probs=self.needs_attn_probs)
        h_BLD = x_BLD + self.drop(a_BLD)
        y_BLD = self.norm2(h_BLD)
        if momentum is not None:
            y_BLD = momentum.lookahead(y_BLD, state)
        aux = None
        if self.is_moe:
            f_BLD, aux = self.ffn(y_BLD, token_ids=token_ids_BL, attn_probs=probs_BHLL)
        else:
            f_BLD = self.ffn(y_BLD)
        f_BLD = self.drop(f_BLD)
        out_BLD = h_BLD + f_BLD if momentum is None else momentum.step(h_BLD, f_BLD, state, is_moe=self.is_moe)
        return self.post_norm(out_BLD), aux


class Transformer(nn.Module):
    """A stack of blocks run in order, carrying the momentum state and collecting each MoE layer's aux.

    Args:
        blocks: the blocks.
        momentum: the momentum rule shared by all blocks, or ``None``.
    """

    def __init__(self, blocks: list[Block], momentum: Momentum | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.momentum = momentum

    def moe_layers(self) -> list[MoE]:
        """The MoE layers, in depth order."""
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(self, x_BLD: Tensor, *, token_ids_BL: Tensor | None = None) -> tuple[Tensor, list[MoEAux]]:
        """Run the blocks; returns ``(x_BLD, [MoEAux per MoE layer, in depth order])``."""
        state = MomentumState() if self.momentum is not None else None  # reset every forward pass
        auxes: list[MoEAux] = []
        for block in self.blocks:
            x_BLD, aux = block(x_BLD, token_ids_BL=token_ids_BL, momentum=self.momentum, state=state)
            if aux is not None:
                auxes.append(aux)
        return x_BLD, auxes

    def set_eval_capacity(self, capacity_factor: float | None, batch_priority: bool | None = None) -> None:
        """Use this capacity factor (and BPR setting) in ``eval()`` mode in every MoE layer, or in none.

        Each layer switches itself (:meth:`smoe.MoE.set_eval_capacity`, V-MoE §3.1.3); training keeps its own
        capacity. If one layer refuses (its router declares no capacity, or the setting would leak in a causal
        model), the layers already changed are restored and the ``ValueError`` is raised.
        """
        layers = self.moe_layers()
        before = [m.capacity_state() for m in layers]
        try:
            for moe in layers:
                moe.set_eval_capacity(capacity_factor, batch_priority)
        except ValueError:
            for moe, state in zip(layers, before, strict=True):
                moe.restore_capacity_state(state)
            raise


def build_transformer(
    *,
    dim: int,
    depth: int,
    num_heads: int,
    mlp_hidden_dim: int,
    mlp_activation: str,
    bias: bool,
    causal: bool,
    moe: MoEConfig,
    momentum: MomentumConfig,
    dropout: float = 0.0,
    norm_eps: float = 1e-5,
    group_size: int | None = None,
    device=None,
    dtype=None,
) -> Transformer:
    """Wire a trunk of ``depth`` blocks, MoE where ``moe`` places them (:func:`~smoe.models.config.moe_layer_indices`).

    Args:
        dim, depth, num_heads, mlp_hidden_dim, mlp_activation, bias, dropout, norm_eps: trunk shape.
        causal: decoder (causal attention, and MoE layers built with ``causal=True``).
        moe: the MoE settings.
        momentum: the momentum settings.
        group_size: routing group size chosen by the model (V-MoE images per group), overriding ``moe.group_size``.

    ``moe.eval_capacity_factor`` / ``moe.eval_batch_priority`` are installed with
    :meth:`Transformer.set_eval_capacity` (they apply in ``eval()`` mode only).
    """
    dd = {"device": device, "dtype": dtype}
    moe_idx = set(moe_layer_indices(depth, moe))
    blocks = []
    for i in range(depth):
        if i in moe_idx:
            ffn: nn.Module = build_moe_layer(
                dim=dim,
                mlp_hidden_dim=mlp_hidden_dim,
                mlp_activation=mlp_activation,
                bias=bias,
                causal=causal,
                moe=moe,
                group_size=group_size,
                **dd,
            )
        else:
            ffn = MLP(dim, mlp_hidden_dim, activation=mlp_activation, bias=bias and mlp_activation != "swiglu", **dd)
        attn = SelfAttention(dim, num_heads, causal=causal, bias=bias, **dd)
        blocks.append(
            Block(
                attn=attn,
                ffn=ffn,
                dim=dim,
                bias=bias,
                dropout=dropout,
                norm_eps=norm_eps,
                post_norm=momentum.post_norm and momentum.kind is not None,
                **dd,
            )
        )
    trunk = Transformer(blocks, Momentum(momentum) if momentum.kind is not None else None)
    if moe_idx and (moe.eval_capacity_factor is not None or moe.eval_batch_priority is not None):
        cf = moe.eval_capacity_factor if moe.eval_capacity_factor is not None else moe.capacity_factor
        trunk.set_eval_capacity(cf, moe.eval_batch_priority)
    return trunk


def build_moe_layer(
    *,
    dim: int,
    mlp_hidden_dim: int,
    mlp_activation: str,
    bias: bool,
    causal: bool,
    moe: MoEConfig,
    group_size: int | None = None,
    device=None,
    dtype=None,
) -> MoE:
    """The MoE layer ``moe`` describes, in a trunk of width ``dim`` whose dense MLPs are ``mlp_hidden_dim`` wide with
    ``mlp_activation`` and ``bias`` (every MoE block of :func:`build_transformer`, and the layers
    :func:`smoe.upcycle` puts in place of dense MLPs, are built here).

    The experts are of ``moe.expert_activation`` (default: the MLP activation), ``moe.hidden_dim`` wide (default:
    the MLP width), with biases as the model's MLPs have them (not SwiGLU ones) unless ``moe.expert_bias`` says.
    """
    activation = moe.expert_activation or mlp_activation
    expert_bias = (bias and activation != "swiglu") if moe.expert_bias is None else moe.expert_bias
    return MoE(
        dim,
        moe.hidden_dim or mlp_hidden_dim,
        moe.num_experts,
        moe.top_k,
        moe.router,
        moe.capacity_factor,
        experts=activation,
        dispatcher=moe.dispatcher,
        expert_bias=expert_bias,
        shared_expert_hidden_dim=moe.shared_expert_hidden_dim,
        shared_expert_gate=moe.shared_expert_gate,
        group_mode=moe.group_mode,
        group_size=group_size if group_size is not None else moe.group_size,
        causal=causal,
        allow_token_coupling=moe.allow_token_coupling,
        backend=moe.backend,
        router_kwargs=dict(moe.router_kwargs),
        check_inputs=moe.check_inputs,
        normalize_weights=moe.normalize_weights,
        device=device,
        dtype=dtype,
    )


def sum_aux_losses(auxes: list[MoEAux], like: Tensor) -> Tensor:
    """``aux_loss`` of a model: the sum of its MoE layers' weighted auxiliary losses (zero if there are none)."""
    total = like.new_zeros((), dtype=torch.float32)
    for aux in auxes:
        total = total + aux.loss
    return total


def moe_metrics(auxes: list[MoEAux]) -> dict[str, Tensor]:
    """Model-level routing metrics summed over the MoE layers (per-layer values stay in ``ModelOutput.moe_aux``).

    ``moe_tokens_processed``: token-layer pairs that reached at least one expert (``MoEAux.stats
    ["tokens_processed"]`` summed over layers); ``moe_tokens_total``: token-layer pairs that entered an MoE layer;
    ``moe_processed_fraction``: their ratio.
    """
    if not auxes:
        return {}
    processed = sum(aux.stats["tokens_processed"].float() for aux in auxes)
    total = sum(float(aux.plan.num_tokens) for aux in auxes if aux.plan is not None)
    metrics = {"moe_tokens_processed": processed}
    if total:
        metrics["moe_tokens_total"] = torch.tensor(total, device=processed.device)
        metrics["moe_processed_fraction"] = processed / total
    return metrics
