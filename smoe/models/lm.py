"""GPT-style decoder-only MoE language model.

Shape legend: ``B`` batch, ``L`` sequence length, ``D`` width, ``V`` vocabulary.

Token + learned position embeddings (GPT-2), a causal trunk of pre-norm blocks (:mod:`smoe.models.block`) with MoE
layers where ``config.moe`` places them, a final LayerNorm and an output projection (tied to the token embedding
by default). The MoE layers are built with ``causal=True``: a router that makes tokens of one sequence compete
(capacity dropping, expert choice, ...) in a group mode other than ``"position"`` is refused with the layer's
``ValueError`` unless ``moe.allow_token_coupling=True``. Token ids are handed to every MoE layer (hash routing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe.layers import MoE
from smoe.models.accounting import AccountingMixin, transformer_flops_per_token
from smoe.models.block import build_transformer, moe_metrics, sum_aux_losses
from smoe.models.config import LMConfig
from smoe.models.output import ModelOutput

__all__ = ["MoELM"]


class MoELM(AccountingMixin, nn.Module):
    """Decoder-only MoE language model.

    Args:
        config: an :class:`~smoe.models.config.LMConfig`.

    ``forward(idx_BL, targets_BL=None) -> ModelOutput``: ``logits`` ``(B, L, V)``; with targets, ``loss`` is the
    mean next-token cross-entropy over positions whose target is not ``-100`` (the caller shifts the targets).
    ``aux_loss`` is the sum of the MoE layers' weighted auxiliary losses; ``moe_aux`` one
    :class:`~smoe.layers.moe.MoEAux` per MoE layer in depth order.
    """

    def __init__(self, config: LMConfig, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, LMConfig):
            raise ValueError(f"MoELM needs an LMConfig, got {type(config).__name__}")
        self.config = config
        c = config
        dd = {"device": device, "dtype": dtype}
        self.tok_emb = nn.Embedding(c.vocab_size, c.dim, **dd)
        self.pos_emb = nn.Embedding(c.seq_len, c.dim, **dd)
        self.drop = nn.Dropout(c.dropout)
        self.trunk = build_transformer(
            dim=c.dim,
            depth=c.depth,
            num_heads=c.num_heads,
            mlp_hidden_dim=c.mlp_hidden_dim,
            mlp_activation=c.mlp_activation,
            bias=c.bias,
            causal=True,
            moe=c.moe,
            momentum=c.momentum,
            dropout=c.dropout,
            norm_eps=c.norm_eps,
            **dd,
        )
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps, bias=c.bias, **dd)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False, **dd)
        self._init_weights()
        if c.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) for embeddings and linear layers, N(0, 0.02/sqrt(2*depth)) for the residual
        projections; MoE layers keep their own init (experts: nn.Linear default per expert; routers: their own)."""
        in_moe = {id(m) for moe in self.modules() if isinstance(moe, MoE) for m in moe.modules()}
        resid_std = 0.02 / (2 * self.config.depth) ** 0.5
        for name, module in self.named_modules():
            if id(module) in in_moe or not isinstance(module, nn.Linear | nn.Embedding):
                continue
            std = resid_std if name.endswith(("attn.proj", "ffn.w2")) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def moe_layers(self) -> list[MoE]:
        """The MoE layers, in depth order."""
        return self.trunk.moe_layers()

    def set_eval_capacity(self, capacity_factor: float | None, batch_priority: bool | None = None) -> None:
        """Capacity factor / BPR used in ``eval()`` mode (see :meth:`smoe.models.block.Transformer.set_eval_capacity`).

        A capacity makes token choice couple tokens, so in this causal model it is refused with ``ValueError``
        unless the MoE groups are ``"position"`` or ``moe.allow_token_coupling`` is set.
        """
        self.trunk.set_eval_capacity(capacity_factor, batch_priority)

    def forward(self, idx_BL: Tensor, targets_BL: Tensor | None = None) -> ModelOutput:
        """Next-token logits (and loss).

        Args:
            idx_BL: ``(B, L)`` int64 token ids in ``[0, vocab_size)``, ``L <= seq_len``.
            targets_BL: optional ``(B, L)`` int64 targets (``-100`` = ignored).

        Returns:
            :class:`~smoe.models.output.ModelOutput` with ``logits`` ``(B, L, V)``.
        """
        c = self.config
        if idx_BL.dim() != 2 or idx_BL.dtype != torch.long:
            raise ValueError(f"idx_BL must be a (B, L) int64 tensor, got {tuple(idx_BL.shape)} {idx_BL.dtype}")
        B, L = idx_BL.shape
        if not 1 <= L <= c.seq_len:
            raise ValueError(f"sequence length {L} must be in [1, seq_len={c.seq_len}]")
        if idx_BL.device.type != "meta" and (int(idx_BL.min()) < 0 or int(idx_BL.max()) >= c.vocab_size):
            raise ValueError(
                f"token ids must be in [0, vocab_size={c.vocab_size}), got range "
                f"[{int(idx_BL.min())}, {int(idx_BL.max())}]"
            )
        pos_L = torch.arange(L, device=idx_BL.device)
        x_BLD = self.drop(self.tok_emb(idx_BL) + self.pos_emb(pos_L))
        x_BLD, auxes = self.trunk(x_BLD, token_ids_BL=idx_BL)
        logits_BLV = self.head(self.norm(x_BLD))
        loss = None
        metrics = moe_metrics(auxes)
        if targets_BL is not None:
            if targets_BL.shape != idx_BL.shape:
                raise ValueError(f"targets_BL shape {tuple(targets_BL.shape)} must equal idx_BL's {(B, L)}")
            loss = F.cross_entropy(logits_BLV.reshape(B * L, -1).float(), targets_BL.reshape(B * L), ignore_index=-100)
        return ModelOutput(
            logits=logits_BLV, loss=loss, aux_loss=sum_aux_losses(auxes, x_BLD), moe_aux=auxes, metrics=metrics
        )

    def context_length(self) -> int:
        """Attention context used by the FLOP count: the configured ``seq_len``."""
        return self.config.seq_len

    @torch.no_grad()
    def generate(
        self,
        idx_BL: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue ``idx_BL`` by ``max_new_tokens`` sampled tokens (no KV cache: each step reruns the last
        ``seq_len`` tokens, which is fine at the sizes this library trains).

        Args:
            idx_BL: ``(B, L)`` int64 prompt ids (``L >= 1``).
            max_new_tokens: tokens to add.
            temperature: ``> 0``; logits are divided by it (``0`` is not allowed: use ``top_k=1`` for greedy).
            top_k: sample among the ``top_k`` most likely tokens only (``None``: all).
            generator: the random generator of the sampling (``None``: the global one).

        Returns:
            ``(B, L + max_new_tokens)`` ids. The model is left in the mode it was in.
        """
        if idx_BL.dim() != 2 or idx_BL.dtype != torch.long or idx_BL.shape[1] < 1:
            raise ValueError(f"idx_BL must be a (B, L >= 1) int64 tensor, got {tuple(idx_BL.shape)} {idx_BL.dtype}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        V = self.config.vocab_size
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= V):
            raise ValueError(f"top_k must be None or an integer in [1, vocab_size={V}], got {top_k!r}")
        was_training = self.training
        self.eval()
        out = idx_BL
        for _ in range(max_new_tokens):
            logits_BV = self(out[:, -self.config.seq_len :]).logits[:, -1, :].float() / temperature
            if top_k is not None:
                kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
                logits_BV = logits_BV.masked_fill(logits_BV < kth, -math.inf)
            next_B1 = torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator)
            out = torch.cat([out, next_B1], dim=1)
        self.train(was_training)
        return out

    def _accounting(self) -> dict[str, float]:
        per_token = transformer_flops_per_token(self.trunk, context_len=self.config.seq_len)
        per_token += 2 * self.head.weight.numel()  # output projection (also when tied)
        return {"flops_per_token": per_token, "tokens_per_sample": self.config.seq_len}
