"""Any ``nn.Module`` as an expert: ``E`` modules run one after the other on their rows.

This is how experts that are not MLPs of stacked weights join an MoE layer -- convolutional decoders (the
SMoE-VAE's), attention blocks, a model's own FFN modules -- behind the same routers and the same engine (vmoe lifts
any expert module into an MoE with ``sparse_moe_spmd`` for the same purpose). Each module maps ``(M, *in)`` rows
to ``(M, *out)`` rows; the output shape may differ from the input's (a latent in, an image out), and the engine
combines whatever shape comes back. There is no fused path: :meth:`ModuleExperts.forward` is a loop over experts,
skipping those without rows.

Parameter layout: expert ``e``'s parameters are those of its module under the prefix ``"{e}."``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from smoe.experts.base import Experts

__all__ = ["ModuleExperts"]


class ModuleExperts(Experts):
    """``E`` arbitrary modules as experts (module docstring).

    Args:
        modules: the expert modules, in expert order (at least one).
        dim: the width of the rows they take (the MoE layer checks it against its own), or ``None``.
    """

    def __init__(self, modules: Iterable[nn.Module], dim: int | None = None) -> None:
        super().__init__()
        modules = list(modules)
        if not modules:
            raise ValueError("ModuleExperts needs at least one expert module")
        for e, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise ValueError(f"expert {e} must be an nn.Module, got {type(m).__name__}")
            self.add_module(str(e), m)
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"dim must be None or a positive integer, got {dim!r}")
        self.num_experts, self.dim = len(modules), dim

    def __getitem__(self, e: int) -> nn.Module:
        return self._modules[str(e)]

    def __len__(self) -> int:
        return self.num_experts

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def shard(self, first: int, count: int) -> ModuleExperts:
        """Experts ``[first, first + count)``, renumbered from 0 (deep copies of their modules)."""
        self._check_shard(first, count)
        out = ModuleExperts([copy.deepcopy(self[e]) for e in range(first, first + count)], dim=self.dim)
        out.train(self.training)
        return out

    def expert_forward(self, e: int, x_MD: Tensor) -> Tensor:
        return self[e](x_MD)

    def forward(self, x_ND: Tensor, counts_E: Tensor, *, kernel: str = "auto") -> Tensor:
        """Each module on its rows, outputs concatenated in row order; ``(N, *in) -> (N, *out)``."""
        counts = counts_E.tolist()
        outs = [self[e](x_s) for e, (x_s, c) in enumerate(zip(x_ND.split(counts), counts)) if c]
        if not outs:  # no rows at all: an empty output of the right trailing shape
            return self[0](x_ND[:0])
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def flops_per_row(self) -> float:
        """The matrix-product FLOPs of one expert's linear layers per row (convolutions and other layers are not
        counted: their cost depends on shapes this class does not know)."""
        layers = [m for m in self[0].modules() if next(m.parameters(recurse=False), None) is not None]
        others = sorted({type(m).__name__ for m in layers if not isinstance(m, nn.Linear)})
        if others:
            raise ValueError(f"ModuleExperts counts FLOPs of nn.Linear layers only; expert 0 also holds {others}")
        return 2.0 * sum(m.weight.numel() for m in layers)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}"
