"""Run a model for a measurement: eval mode, no gradients, its train/eval mode restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["evaluating"]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[torch.device]:
    """``with evaluating(model) as device:`` -- ``model`` in eval mode under ``no_grad``; yields the device of its
    parameters (CPU for a model without any), where the measurement's inputs must go."""
    was = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    try:
        with torch.no_grad():
            yield device
    finally:
        model.train(was)
