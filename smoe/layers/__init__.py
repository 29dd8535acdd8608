"""Layers: stacked experts, dense MLP, and the MoE layer."""

from smoe.layers.experts import MLP, Experts
from smoe.layers.moe import GROUP_MODES, MoE, MoEAux

__all__ = ["Experts", "MLP", "MoE", "MoEAux", "GROUP_MODES"]
