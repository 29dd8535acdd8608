"""Adaptive compute (V-MoE, Riquelme et al., NeurIPS 2021, §4.1 and Fig. 6): accuracy as the evaluation capacity
factor falls, with and without Batch Prioritized Routing.

A model trained with capacity-limited token choice is evaluated at capacity factors ``cf`` (about 0.1 to 2):
every capacity-limited MoE layer gets ``set_eval_capacity(cf, batch_priority)``. Vanilla routing drops overflow in
token order, BPR drops the tokens with the lowest top-1 gate first, so V-MoE's claim is that BPR degrades
gracefully below ``cf = 1``. Each point reports the accuracy, the fraction of (token, expert) assignments the
experts processed (``1 - drop rate``, over the capacity-limited layers and all batches), to which the experts'
FLOPs are proportional (the dropless model processes 1).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from smoe.analysis.evaluation import evaluating
from smoe.layers.moe import MoE
from smoe.routing.plan import SparsePlan

__all__ = ["capacity_curve", "capacity_layers"]


def capacity_layers(model: nn.Module) -> list[MoE]:
    """The MoE layers whose router takes an evaluation capacity factor."""
    return [m for m in model.modules() if isinstance(m, MoE) and "capacity_factor" in m.router.capacity_options]


def capacity_curve(
    model: nn.Module,
    images_NCHW: Tensor,
    labels_N: Tensor,
    capacity_factors: Sequence[float],
    *,
    batch_priority: bool,
    batch_size: int = 256,
) -> list[dict[str, float]]:
    """One point per capacity factor: ``{"capacity_factor", "accuracy", "processed"}``.

    The layers' evaluation capacity is restored afterwards. ``ValueError`` if no layer takes a capacity.
    """
    layers = capacity_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer with a capacity-limited router")
    saved = [layer.capacity_state() for layer in layers]
    points = []
    with evaluating(model) as device:
        try:
            for cf in capacity_factors:
                for layer in layers:
                    layer.set_eval_capacity(float(cf), batch_priority)
                correct, rows, requested = 0, 0, 0
                for i in range(0, labels_N.shape[0], batch_size):
                    out = model(images_NCHW[i : i + batch_size].to(device))
                    correct += int((out.logits.argmax(-1).cpu() == labels_N[i : i + batch_size]).sum())
                    for aux in out.moe_aux:
                        if isinstance(aux.plan, SparsePlan):
                            rows += aux.plan.num_rows
                            requested += aux.plan.num_requested
                points.append(
                    {
                        "capacity_factor": float(cf),
                        "accuracy": correct / labels_N.shape[0],
                        "processed": rows / max(requested, 1),
                    }
                )
        finally:
            for layer, state in zip(layers, saved, strict=True):
                layer.restore_capacity_state(state)
    return points
