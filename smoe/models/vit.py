"""V-MoE: a vision transformer whose MLP blocks are (partly) MoE layers (Riquelme et al., NeurIPS 2021, arXiv
2106.05974; reference §3.1.5; Soft MoE placement §6.2).

Shape legend: ``B`` images, ``C`` channels, ``H x W`` pixels, ``P`` patch side, ``N`` tokens per image (patches,
plus one class token with ``pool="cls"``), ``D`` width, ``G`` routing groups.

Routing groups across images, as in vmoe: with ``moe.images_per_group = n`` the MoE layers route in contiguous
groups of ``n * N`` tokens, i.e. ``n`` whole images, so capacity and Batch Prioritized Routing make the patches of
those images compete (V-MoE uses 8 images per group); the batch must then be divisible by ``n``. Without it, the
groups follow ``moe.group_mode`` (``"sequence"`` = one image per group, as Soft MoE and vision expert choice).

Evaluation capacity: :meth:`VisionMoE.set_eval_capacity` (or ``moe.eval_capacity_factor`` /
``moe.eval_batch_priority``) changes the capacity factor and BPR in ``eval()`` mode only, e.g. ``cf < 1`` with BPR
for adaptive compute (§3.1.3). ``ModelOutput.metrics["moe_tokens_processed"]`` reports how many token-layer pairs
reached an expert (per layer: ``MoEAux.stats["tokens_processed"]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smoe.layers import MoE
from smoe.models.accounting import AccountingMixin, transformer_flops_per_token
from smoe.models.block import build_transformer, moe_metrics, sum_aux_losses
from smoe.models.config import ViTConfig
from smoe.models.output import ModelOutput

__all__ = ["VisionMoE"]


class VisionMoE(AccountingMixin, nn.Module):
    """Vision transformer with MoE blocks and a classification head.

    Args:
        config: a :class:`~smoe.models.config.ViTConfig`.

    ``forward(images_BCHW, targets_B=None) -> ModelOutput``: ``logits`` ``(B, num_classes)``; with targets,
    ``loss`` is the mean cross-entropy and ``metrics["accuracy"]`` the top-1 accuracy.
    """

    def __init__(self, config: ViTConfig, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise ValueError(f"VisionMoE needs a ViTConfig, got {type(config).__name__}")
        self.config = config
        c = config
        dd = {"device": device, "dtype": dtype}
        self.num_patches = (c.image_size // c.patch_size) ** 2
        self.tokens_per_image = c.tokens_per_image
        group_size = None if c.moe.images_per_group is None else c.moe.images_per_group * self.tokens_per_image
        self.patch_embed = nn.Conv2d(c.in_channels, c.dim, c.patch_size, stride=c.patch_size, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim, **dd)) if c.pool == "cls" else None
        self.pos_emb = nn.Parameter(torch.empty(1, self.tokens_per_image, c.dim, **dd))
        self.trunk = build_transformer(
            dim=c.dim,
            depth=c.depth,
            num_heads=c.num_heads,
            mlp_hidden_dim=c.mlp_hidden_dim,
            mlp_activation=c.mlp_activation,
            bias=c.bias,
            causal=False,
            moe=c.moe,
            momentum=c.momentum,
            dropout=c.dropout,
            norm_eps=c.norm_eps,
            group_size=group_size,
            **dd,
        )
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps, bias=c.bias, **dd)
        self.head = nn.Linear(c.dim, c.num_classes, **dd)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """ViT init: position embedding N(0, 0.02); non-MoE linear layers Xavier-uniform with zero bias (big_vision);
        head N(0, 0.02) with zero bias (timm; vmoe's zero head would give the trunk no gradient at step 0).
        MoE layers keep their own init."""
        nn.init.normal_(self.pos_emb, std=0.02)
        in_moe = {id(m) for moe in self.modules() if isinstance(moe, MoE) for m in moe.modules()}
        for module in self.trunk.modules():
            if isinstance(module, nn.Linear) and id(module) not in in_moe:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def moe_layers(self) -> list[MoE]:
        """The MoE layers, in depth order."""
        return self.trunk.moe_layers()

    def set_eval_capacity(self, capacity_factor: float | None, batch_priority: bool | None = None) -> None:
        """Capacity factor (``None`` = dropless) and Batch Prioritized Routing used in ``eval()`` mode.

        Training keeps the capacity it was built with; ``model.eval()`` / ``model.train()`` switch between the two.
        Raises ``ValueError`` if a router has no capacity to change.
        """
        self.trunk.set_eval_capacity(capacity_factor, batch_priority)

    def _check_images(self, images_BCHW: Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if images_BCHW.dim() != 4 or tuple(images_BCHW.shape[1:]) != expected:
            raise ValueError(f"images must be (B, {', '.join(map(str, expected))}), got {tuple(images_BCHW.shape)}")
        if not images_BCHW.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor, got {images_BCHW.dtype}")
        n = c.moe.images_per_group
        if n is not None and self.trunk.moe_layers() and images_BCHW.shape[0] % n:
            raise ValueError(
                f"batch size {images_BCHW.shape[0]} is not divisible by moe.images_per_group={n} (V-MoE routes in "
                f"groups of whole images); use a batch that is a multiple of {n}"
            )

    def forward(self, images_BCHW: Tensor, targets_B: Tensor | None = None) -> ModelOutput:
        """Classify.

        Args:
            images_BCHW: ``(B, C, H, W)`` float images.
            targets_B: optional ``(B,)`` int64 class labels.

        Returns:
            :class:`~smoe.models.output.ModelOutput` with ``logits`` ``(B, num_classes)``.
        """
        self._check_images(images_BCHW)
        B = images_BCHW.shape[0]
        x_BND = self.patch_embed(images_BCHW).flatten(2).transpose(1, 2)  # (B, D, H/P, W/P) -> (B, N, D)
        if self.cls_token is not None:
            x_BND = torch.cat([self.cls_token.expand(B, -1, -1), x_BND], dim=1)
        x_BND = x_BND + self.pos_emb
        x_BND, auxes = self.trunk(x_BND)
        x_BND = self.norm(x_BND)
        pooled_BD = x_BND[:, 0] if self.cls_token is not None else x_BND.mean(dim=1)
        logits_BC = self.head(pooled_BD)
        loss = None
        metrics = moe_metrics(auxes)
        if targets_B is not None:
            if targets_B.shape != (B,):
                raise ValueError(f"targets_B must have shape ({B},), got {tuple(targets_B.shape)}")
            loss = F.cross_entropy(logits_BC.float(), targets_B)
            metrics["accuracy"] = (logits_BC.argmax(dim=-1) == targets_B).float().mean()
        return ModelOutput(
            logits=logits_BC, loss=loss, aux_loss=sum_aux_losses(auxes, x_BND), moe_aux=auxes, metrics=metrics
        )

    def _accounting(self) -> dict[str, float]:
        N = self.tokens_per_image
        per_image = N * transformer_flops_per_token(self.trunk, context_len=N)
        per_image += 2 * self.num_patches * self.patch_embed.weight.numel()  # one conv output per patch
        per_image += 2 * self.head.weight.numel()  # one head per image
        return {"flops_per_token": per_image / N, "tokens_per_sample": N}
