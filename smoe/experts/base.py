"""The expert contract: experts compute themselves on rows already grouped by expert.

The engine (:mod:`smoe.engine`) moves tokens: a dispatcher turns the layer's rows and a routing plan into rows
*grouped by expert* (expert ``e`` owns the next ``counts_E[e]`` rows) and, after the experts ran, combines their
outputs back into tokens. Experts never see the plan in that path; they only run::

    x_ND, counts_E, state = dispatcher.dispatch(x_RD, plan)     # engine
    y_ND = experts(x_ND, counts_E)                              # this package
    y_T = dispatcher.combine(y_ND, state)                       # engine

This is the seam an expert-parallel dispatcher uses: between ``dispatch`` and the experts it sends rows to the
rank that holds their expert, and ``counts_E`` then counts the rows of the experts held locally (torchtitan's
``GroupedExperts.forward(x, num_tokens_per_expert)`` is the same idea).

Two more entry points, both optional for a new expert type:

* :meth:`Experts.expert_forward` -- expert ``e`` alone on some rows: the plain definition the reference engine
  (:mod:`smoe.engine.reference`) loops over. Every expert type implements it; the contract tests check
  ``forward`` against it on outputs and every gradient.
* :meth:`Experts.fused_sparse` -- gather, experts and weighted combine in one op, for a *local* dispatcher to take
  when :attr:`Experts.can_fuse` says the type offers it (the default SwiGLU experts do; see
  :mod:`smoe.experts.fused_swiglu` for why it pays on CPU). It must compute exactly what the seam path computes.

Shape legend: ``R`` rows of the layer input, ``T`` output tokens, ``N`` rows grouped by expert, ``M`` rows of one
expert, ``E`` experts, ``D`` input width.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from smoe.routing.plan import SparsePlan

__all__ = ["Experts"]


class Experts(nn.Module):
    """Base class of every expert type: ``E`` experts that run on rows grouped by expert.

    Subclasses set ``num_experts`` and ``dim`` (the input width, or ``None`` when it is not fixed) and implement
    :meth:`forward` and :meth:`expert_forward`.
    """

    #: registry name (set by :func:`smoe.experts.register_experts`; ``None`` for unregistered types)
    registry_name: ClassVar[str | None] = None

    num_experts: int
    dim: int | None

    @property
    def can_fuse(self) -> bool:
        """Whether :meth:`fused_sparse` is available for this instance."""
        return False

    def forward(self, x_ND: Tensor, counts_E: Tensor, *, kernel: str = "auto") -> Tensor:  # pragma: no cover
        """Run expert ``e`` on its contiguous segment of rows, for every ``e``.

        Args:
            x_ND: ``(N, D)`` rows grouped by expert: expert ``e`` owns rows ``offsets[e]:offsets[e+1]`` with
                ``offsets = [0, cumsum(counts_E)]``.
            counts_E: ``(E,)`` int64 rows per expert.
            kernel: requested GEMM kernel (:mod:`smoe.experts.kernels`); types without GEMMs of their own ignore it.

        Returns:
            ``(N, ...)`` outputs, row ``n`` from row ``n`` of the input.
        """
        raise NotImplementedError

    def expert_forward(self, e: int, x_MD: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The plain definition of expert ``e`` on ``(M, D)`` rows (the reference engine's oracle)."""
        raise NotImplementedError

    def fused_sparse(self, x_RD: Tensor, plan: SparsePlan, *, kernel: str = "auto") -> Tensor:  # pragma: no cover
        """``y[t] = sum_{rows n of token t} weight[n] * f_{expert[n]}(x[source[n]])`` in one op (``can_fuse``)."""
        raise NotImplementedError(f"{type(self).__name__} offers no fused path (can_fuse is False)")

    def shard(self, first: int, count: int) -> Experts:
        """Experts ``[first, first + count)`` as a new module of the same type, holding copies of their weights
        (what an expert-parallel rank keeps of the full layer; :func:`smoe.layers.apply_expert_parallel`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be sharded over processes (no shard method)")

    def _check_shard(self, first: int, count: int) -> None:
        for name, value in (("first", first), ("count", count)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if first < 0 or count < 1 or first + count > self.num_experts:
            raise ValueError(f"experts [{first}, {first + count}) are not a range of the {self.num_experts} experts")

    def flops_per_row(self) -> float:
        """Forward FLOPs one expert spends on one row (multiply-adds of its matrix products count 2), for the
        parameter and FLOP accounting of :mod:`smoe.models.accounting`."""
        raise ValueError(f"{type(self).__name__} does not declare its FLOPs per row")
