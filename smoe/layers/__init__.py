"""Layers: the MoE layer (router -> plan -> dispatch -> experts -> combine). The dense ``MLP`` and the stacked
experts live in :mod:`smoe.experts` and are re-exported here for the layer's users."""

from smoe.experts import MLP, Experts
from smoe.layers.moe import GROUP_MODES, MoE, MoEAux

__all__ = ["MoE", "MoEAux", "GROUP_MODES", "MLP", "Experts"]
