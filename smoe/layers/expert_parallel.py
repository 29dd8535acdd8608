"""Expert parallelism for a whole model: shard its MoE layers' experts over a process group, and move state
between the one-process ("global") form and a rank's ("local") form.

The model is built as in one process, with the same seed, so every rank starts from the same weights; then
:func:`apply_expert_parallel` puts each MoE layer on an :class:`~smoe.engine.AllToAllDispatcher` and keeps only
the experts that rank holds (torchtitan applies its expert parallelism to a model built on one device the same
way). Building the full model first costs one full copy per rank at start-up, which is fine at the sizes this
library trains on CPU; a model too large for one process would need per-expert seeded initialisation instead.

State in global form is what one process holds: every expert, numbered ``0..E-1``. A checkpoint stores that form
(:mod:`smoe.train.checkpoint`), so that it does not depend on how many ranks wrote it:

* :func:`gather_expert_state` -- a rank's state dict (model weights, or any dict keyed by parameter name such as
  an optimizer's moments) to the global form, gathering each sharded expert tensor over the layer's group
  (a collective: every rank of the group calls it with the same keys);
* :func:`shard_model_state` -- the global form to this rank's part (no communication).

Names: stacked expert tensors (``<layer>.experts.w1_EFD``) are concatenated / sliced on their expert axis; module
experts (``<layer>.experts.{e}.*``) are renumbered; a 0-d entry under a stacked name (an optimizer's step count of
the stack) is the same on every rank and kept as it is; every other entry is replicated and passes through.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from smoe.engine import AllToAllDispatcher, shard_expert_state
from smoe.engine.all_to_all import _MODULE, _STACKED
from smoe.layers.moe import MoE

__all__ = [
    "apply_expert_parallel",
    "expert_parallel_layers",
    "sharded_expert_names",
    "gather_expert_state",
    "shard_model_state",
]


def expert_parallel_layers(model: nn.Module) -> dict[str, MoE]:
    """``{prefix: layer}`` for every MoE layer of ``model`` whose experts are sharded (prefix ends with ``"."``,
    or is ``""`` for the model itself)."""
    return {
        (name + "." if name else ""): m
        for name, m in model.named_modules()
        if isinstance(m, MoE) and not m.dispatcher.local
    }


def apply_expert_parallel(model: nn.Module, group=None) -> list[str]:
    """Shard the experts of every MoE layer of ``model`` over ``group`` (in place); returns the layers' names.

    Each rank keeps experts ``[rank * E / P, (rank + 1) * E / P)`` of the one-process model (``P`` the group's
    size) and exchanges token rows with the others (:class:`~smoe.engine.AllToAllDispatcher`). Every rank of the
    group must call this on the same model; a layer whose configuration differs across ranks is refused.

    Raises:
        ValueError: no process group, ``E`` not divisible by ``P``, a layer already sharded, or a model without
            an MoE layer.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer to shard")
    for _, layer in layers:
        layer.shard_experts(AllToAllDispatcher(group))
    return [name for name, _ in layers]


def sharded_expert_names(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers held by sharded experts (each rank holds different ones)."""
    names = []
    for prefix, layer in expert_parallel_layers(model).items():
        names += [f"{prefix}experts.{n}" for n, _ in layer.experts.named_parameters()]
        names += [f"{prefix}experts.{n}" for n, _ in layer.experts.named_buffers()]
    return names


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def gather_expert_state(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` (keyed like ``model.state_dict()``) in global form: every sharded expert tensor gathered over its
    layer's group (module docstring). Entries that are not sharded experts are returned as they are.

    A key that some ranks lack (an optimizer holds no moments yet for a module expert that never received a row)
    is filled with zeros on those ranks, which is the optimizer's initial state.
    """
    out: dict[str, Tensor] = {}
    consumed: set[str] = set()
    for prefix, layer in expert_parallel_layers(model).items():
        d = layer.dispatcher
        count = d.num_local_experts(layer.num_experts)
        head = prefix + "experts."
        mine = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(head)}
        consumed |= {prefix + k for k in mine}
        specs = {k: (tuple(v.shape), str(v.dtype)) for k, v in mine.items()}
        everyone: list = [None] * d.size
        dist.all_gather_object(everyone, specs, group=d.group)
        union: dict = {}
        for s in everyone:
            union.update(s)
        for key in sorted(union):
            shape, dtype = union[key]
            t = mine.get(key)
            if t is None:
                device = next(iter(mine.values())).device if mine else torch.device("cpu")
                t = torch.zeros(shape, dtype=_dtype(dtype), device=device)
            stacked = _STACKED.search(key) is not None
            if stacked and t.dim() == 0:
                out[prefix + key] = t
                continue
            parts = [torch.empty_like(t) for _ in range(d.size)]
            dist.all_gather(parts, t.contiguous(), group=d.group)
            if stacked:
                out[prefix + key] = torch.cat(parts)
            elif m := _MODULE.match(key):
                e = int(m.group(2))
                for r, part in enumerate(parts):
                    out[f"{prefix}{m.group(1)}{r * count + e}.{m.group(3)}"] = part
            else:  # not per-expert (should not occur): identical on every rank
                out[prefix + key] = t
    for key, value in state.items():
        if key not in consumed:
            out[key] = value
    return out


def shard_model_state(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """This rank's part of a global-form ``state`` (keyed like the one-process ``state_dict()``): each sharded
    layer's experts ``[first, first + count)``, renumbered from 0; every other entry unchanged."""
    out = dict(state)
    for prefix, layer in expert_parallel_layers(model).items():
        d = layer.dispatcher
        first, count = d.first_local_expert(layer.num_experts), d.num_local_experts(layer.num_experts)
        head = prefix + "experts."
        sub = {k[len(prefix) :]: out.pop(k) for k in [k for k in out if k.startswith(head)]}
        out.update({prefix + k: v for k, v in shard_expert_state(sub, layer.num_experts, first, count).items()})
    return out
