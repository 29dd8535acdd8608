"""Momentum across MoE layers: MomentumSMoE, AdamSMoE and Robust MomentumSMoE (Teo & Nguyen, NeurIPS 2024,
arXiv 2410.14574; reference §7).

A residual MoE layer ``x_{t+1} = x_t + f(x_t)`` is read as one gradient step; momentum is then carried from MoE
layer to MoE layer *inside one forward pass* (``t`` = layer index). The state is a per-token tensor of the trunk's
shape, reset to zero at the start of every forward (never carried across batches or segments, as in the authors'
code). Notation: ``h`` = the block input plus its attention output, ``f`` = the block's FFN/MoE output.

Update rules, per block (ours; the authors' code is quoted in reference §7.3-7.6):

* plain (``kind=None``): ``x = h + f``.
* ``"heavy_ball"`` (MomentumSMoE, §7.2, 7.3, 7.6). MoE blocks: ``m = mu * m + gamma * f``; ``x = h + m``.
  Dense blocks: ``x = h + f`` and ``m`` passes through unchanged.
* ``"adam"`` (AdamSMoE, §7.4). The first ``adam_layers`` MoE blocks (1 in the authors' code):
  ``m = mu * m + gamma * f`` (still accumulated), ``p = beta1 * p + (1 - beta1) * f``,
  ``v = beta2 * v + (1 - beta2) * f**2``, ``x = h + adam_gamma * p / sqrt(v + adam_eps)``, no bias correction
  (as the code; the paper's own equation is unconfirmed in the reference). Later MoE blocks: heavy ball.
* ``"robust"`` (Robust MomentumSMoE, §7.5; Cyrus et al. 2018 with ``L = lipschitz``): coefficients
  ``(eps, beta, alpha)`` from :func:`~smoe.models.config.robust_momentum_coefficients`. Every block's FFN input
  gets the lookahead ``y = LN(h) + eps * beta * m``; MoE blocks: ``m = f + alpha * m``, ``x = h + beta * m``;
  dense blocks: ``x = h + f``.

Where this differs from the authors' code, and why:

1. **Sign.** The authors write ``x - m`` with ``m = mu m + gamma f`` (the paper's ``f = -grad F`` framing, §7.2) and
   ``moment = -f + alpha moment`` in the robust code. We flip the sign of ``f`` (an expert's last linear layer
   absorbs it, reference §7.9), so that ``kind="heavy_ball", mu=0, gamma=1`` is *exactly* the plain residual model
   and momentum is a strict generalisation of it. With ``f_ours = -f_theirs`` every state tensor, lookahead and
   output is identical to theirs.
2. **Norms.** The authors' LM code is a post-LN Transformer-XL with a double residual and double LayerNorm in every
   SMoE sub-layer, baseline included (``h = LN2(h + LN(h - m))``, §7.3). We keep the library's single pre-norm
   block (``x = h + m``) so that plain and momentum models differ only in the update. Their V-MoE code applies a
   LayerNorm after every block's update; ``post_norm=True`` reproduces that (then ``mu = 0`` is no longer the plain
   model, since an extra norm was added).
3. **Dropout** on ``f`` happens before the update, as their ``f = dropout(FMoE(h))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from smoe.models.config import MomentumConfig, robust_momentum_coefficients

__all__ = ["Momentum", "MomentumState"]


@dataclass
class MomentumState:
    """Momentum state carried through the blocks of one forward pass (all ``None`` = zero).

    Attributes:
        m: heavy-ball / robust momentum, the trunk's shape ``(B, L, D)``.
        p: AdamSMoE first moment.
        v: AdamSMoE second moment.
        moe_index: number of MoE blocks already passed.
    """

    m: Tensor | None = None
    p: Tensor | None = None
    v: Tensor | None = None
    moe_index: int = 0


class Momentum(nn.Module):
    """The update rule shared by all blocks of a trunk (no parameters; the state lives in :class:`MomentumState`).

    Args:
        config: a :class:`~smoe.models.config.MomentumConfig` with ``kind`` not ``None``.
    """

    def __init__(self, config: MomentumConfig) -> None:
        super().__init__()
        if config.kind is None:
            raise ValueError("Momentum needs momentum.kind in ('heavy_ball', 'adam', 'robust'), got None")
        self.config = config
        self.kind = config.kind
        if self.kind == "robust":
            self.eps, self.beta, self.alpha = robust_momentum_coefficients(config.rho, config.kappa, config.lipschitz)

    def lookahead(self, y: Tensor, state: MomentumState) -> Tensor:
        """The FFN input: ``y + eps * beta * m`` for robust momentum, ``y`` otherwise."""
        if self.kind == "robust" and state.m is not None:
            return y + (self.eps * self.beta) * state.m
        return y

    def step(self, h: Tensor, f: Tensor, state: MomentumState, *, is_moe: bool) -> Tensor:
        """One block's update: returns the block output and updates ``state`` in place (see module docstring)."""
        if not is_moe:
            return h + f  # dense blocks pass the momentum through unchanged
        c = self.config
        m = torch.zeros_like(f) if state.m is None else state.m
        index = state.moe_index
        state.moe_index += 1
        if self.kind == "robust":
            state.m = f + self.alpha * m
            return h + self.beta * state.m
        state.m = c.mu * m + c.gamma * f
        if self.kind == "adam" and index < c.adam_layers:
            p = torch.zeros_like(f) if state.p is None else state.p
            v = torch.zeros_like(f) if state.v is None else state.v
            state.p = c.beta1 * p + (1.0 - c.beta1) * f
            state.v = c.beta2 * v + (1.0 - c.beta2) * f.square()
            return h + c.adam_gamma * state.p / torch.sqrt(state.v + c.adam_eps)
        return h + state.m

    def extra_repr(self) -> str:
        c = self.config
        if self.kind == "robust":
            return f"robust, eps={self.eps:.4g}, beta={self.beta:.4g}, alpha={self.alpha:.4g}"
        text = f"{self.kind}, mu={c.mu}, gamma={c.gamma}"
        if self.kind == "adam":
            text += f", adam_gamma={c.adam_gamma}, beta1={c.beta1}, beta2={c.beta2}, adam_layers={c.adam_layers}"
        return text
