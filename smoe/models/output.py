"""The value every model's ``forward`` returns, so that the trainer and the study treat all models alike."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from smoe.layers.moe import MoEAux

__all__ = ["ModelOutput"]


@dataclass(kw_only=True)
class ModelOutput:
    """Output of an smoe model.

    Attributes:
        logits: task logits (``(B, L, V)`` for a language model, ``(B, num_classes)`` for a classifier) or the
            reconstruction (SMoE-VAE).
        loss: the task loss (cross-entropy, or the VAE's ELBO terms) when targets were given, else ``None``.
        aux_loss: the sum over MoE layers of their weighted auxiliary losses (a scalar tensor, zero if none).
        moe_aux: one :class:`~smoe.layers.moe.MoEAux` per MoE layer, in depth order (routing statistics).
        metrics: extra scalar metrics of the model (e.g. accuracy, KL term), tensors.
    """

    logits: Tensor
    loss: Tensor | None = None
    aux_loss: Tensor | None = None
    moe_aux: list[MoEAux] = field(default_factory=list)
    metrics: dict[str, Tensor] = field(default_factory=dict)

    @property
    def total_loss(self) -> Tensor:
        """``loss + aux_loss``: what the trainer back-propagates."""
        if self.loss is None:
            raise ValueError("total_loss needs a task loss: call the model with targets")
        return self.loss if self.aux_loss is None else self.loss + self.aux_loss
