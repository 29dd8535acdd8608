"""Multi-head self-attention with a fused path and a manual path that also returns the probabilities.

Shape legend: ``B`` batch, ``L`` sequence length, ``D`` width, ``H`` heads, ``Dh = D / H`` head width.

The fused path calls :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels
where available). Those kernels never materialise the attention matrix, so when the next MoE layer's router needs
the probabilities (attention-aware routing, Graph of Tokens, reference §3.3) the block asks for ``need_probs=True``
and the manual path computes ``softmax(q k^T / sqrt(Dh) + mask) v`` explicitly and returns
``probs_BHLL``. The two paths agree to rounding (tested in float64); the manual one is also the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SelfAttention"]


class SelfAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017), GPT-2 / ViT layout: one fused ``qkv`` projection.

    Args:
        dim: model width ``D``.
        num_heads: ``H``; must divide ``dim``.
        causal: mask future positions (decoder).
        bias: biases on the ``qkv`` and output projections.
        dropout: dropout on the attention probabilities (training only).

    Attributes:
        fused: use ``scaled_dot_product_attention`` when the probabilities are not needed (set ``False`` to force
            the manual path, e.g. to count FLOPs with :class:`torch.utils.flop_counter.FlopCounterMode`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool,
        bias: bool = False,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        dd = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.causal, self.dropout = dim, num_heads, causal, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias, **dd)
        self.proj = nn.Linear(dim, dim, bias=bias, **dd)
        self.fused = True

    def forward(self, x_BLD: Tensor, *, need_probs: bool = False) -> tuple[Tensor, Tensor | None]:
        """Attend.

        Args:
            x_BLD: ``(B, L, D)`` (already normalised by the block).
            need_probs: also return the attention probabilities.

        Returns:
            ``(y_BLD, probs_BHLL)``, ``probs_BHLL`` is ``None`` unless ``need_probs``; rows sum to one (before
            dropout), and are zero above the diagonal when causal.
        """
        B, L, D = x_BLD.shape
        H = self.num_heads
        q, k, v = self.qkv(x_BLD).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # each (B, H, L, Dh)
        p_drop = self.dropout if self.training else 0.0
        probs_BHLL = None
        if self.fused and not need_probs:
            y_BHLd = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=self.causal)
        else:
            scores_BHLL = (q @ k.transpose(-2, -1)) / math.sqrt(D // H)
            if self.causal:
                future_LL = torch.ones(L, L, dtype=torch.bool, device=x_BLD.device).triu(1)
                scores_BHLL = scores_BHLL.masked_fill(future_LL, float("-inf"))
            probs_BHLL = scores_BHLL.softmax(dim=-1)
            y_BHLd = F.dropout(probs_BHLL, p_drop, self.training) @ v
        y_BLD = y_BHLd.transpose(1, 2).reshape(B, L, D)
        return self.proj(y_BLD), probs_BHLL

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, causal={self.causal}"
