"""What every MoE layer of a model routed, token by token: its input representations, the experts it chose and the
tokens' labels, collected over a probe set with forward hooks (the layer's public ``forward`` output, no internals).

``probe_routing(model, batches)`` runs the model in evaluation mode without gradients; per MoE layer it returns a
:class:`LayerProbe` with, in one order (the router's, :meth:`smoe.MoE.routing_order`):

* ``h_ND``: the routed representations (the layer's input), for representation collapse and embeddings;
* ``choices_NK``: each token's ``K`` experts of largest combine weight (``-1`` where fewer took it), for
  fluctuation and specialisation (top-1 is ``choices_NK[:, 0]``);
* ``labels_N``: the token's label when the batches carry one (an image's class repeated over its patches, the
  byte class of a text token), else ``None``.

Shape legend: ``N`` probe tokens over all batches, ``D`` width, ``K`` choices kept, ``E`` experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from smoe.analysis.evaluation import evaluating
from smoe.layers.moe import MoE
from smoe.routing.plan import DensePlan, SparsePlan

__all__ = ["LayerProbe", "probe_routing", "plan_weights"]


@dataclass
class LayerProbe:
    """One MoE layer's routing of the probe set (module docstring)."""

    name: str
    h_ND: Tensor
    choices_NK: Tensor
    labels_N: Tensor | None
    num_experts: int

    @property
    def top1_N(self) -> Tensor:
        return self.choices_NK[:, 0]

    @property
    def load_E(self) -> Tensor:
        """Top-1 tokens per expert (float64)."""
        top1 = self.top1_N[self.top1_N >= 0]
        return torch.bincount(top1, minlength=self.num_experts).double()


def plan_weights(plan: SparsePlan | DensePlan, num_tokens: int) -> Tensor:
    """``(T, E)`` combine weight of each token on each expert (a dense plan's slots summed)."""
    if isinstance(plan, SparsePlan):
        out = plan.weight_N.new_zeros(num_tokens, plan.num_experts)
        return out.index_put_((plan.token_idx_N, plan.expert_idx_N), plan.weight_N, accumulate=True)
    G, S, E, _ = plan.combine_GSEC.shape
    return plan.combine_GSEC.sum(-1).reshape(G * S, E)


def probe_routing(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor | None]],
    *,
    k: int | None = None,
    call: Callable[[nn.Module, Tensor], object] | None = None,
) -> list[LayerProbe]:
    """Collect every MoE layer's routing over ``batches`` (module docstring).

    Args:
        model: a module holding :class:`smoe.MoE` layers.
        batches: ``(inputs, labels)`` pairs; ``labels`` is ``None``, one label per example ``(B,)`` (repeated over
            the example's tokens) or one per token ``(B, L)``.
        k: choices kept per token (default: each layer's ``top_k``).
        call: ``call(model, inputs)`` runs the model (default ``model(inputs)``).

    Returns:
        One :class:`LayerProbe` per MoE layer, in module order. The model's train/eval mode is restored.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no smoe.MoE layer to probe")
    store: dict[str, dict[str, list[Tensor]]] = {n: {"h": [], "c": [], "y": []} for n, _ in layers}
    current: dict[str, Tensor | None] = {"labels": None}

    def hook_for(name: str):
        def hook(layer: MoE, args, output):
            x = args[0]
            _, aux = output
            x_TD = layer.routing_order(x).detach()
            kk = min(k or layer.top_k, layer.num_experts)
            w_TE = plan_weights(aux.plan, x_TD.shape[0]).detach()
            values, idx = w_TE.topk(kk, dim=-1)
            store[name]["h"].append(x_TD.float().cpu())
            store[name]["c"].append(torch.where(values > 0, idx, torch.full_like(idx, -1)).cpu())
            labels = current["labels"]
            if labels is not None:
                lead = x.shape[:-1]
                if labels.dim() == 1 and len(lead) == 2:  # one label per example: repeat over its tokens
                    labels = labels[:, None].expand(lead)
                if labels.shape != lead:
                    raise ValueError(
                        f"labels of shape {tuple(labels.shape)} do not fit layer {name!r}'s tokens {tuple(lead)}"
                    )
                store[name]["y"].append(layer.routing_order(labels.unsqueeze(-1)).squeeze(-1).cpu())

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in layers]
    try:
        with evaluating(model) as device:
            for inputs, labels in batches:
                current["labels"] = labels
                (call or (lambda m, x: m(x)))(model, inputs.to(device))
    finally:
        for h in handles:
            h.remove()
    probes = []
    for name, layer in layers:
        got = store[name]
        if not got["h"]:
            raise ValueError(f"layer {name!r} never ran on the probe batches")
        probes.append(
            LayerProbe(
                name=name,
                h_ND=torch.cat(got["h"]),
                choices_NK=torch.cat(got["c"]),
                labels_N=torch.cat(got["y"]) if got["y"] else None,
                num_experts=layer.num_experts,
            )
        )
    return probes
