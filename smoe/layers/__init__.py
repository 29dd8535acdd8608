"""Layers: the MoE layer (router -> plan -> dispatch -> experts -> combine). The dense ``MLP`` and the stacked
experts live in :mod:`smoe.experts` and are re-exported here for the layer's users."""

from smoe.experts import MLP, Experts
from smoe.layers.expert_parallel import (
    apply_expert_parallel,
    expert_parallel_layers,
    gather_expert_state,
    shard_model_state,
    sharded_expert_names,
)
from smoe.layers.moe import GROUP_MODES, MoE, MoEAux

__all__ = [
    "MoE",
    "MoEAux",
    "GROUP_MODES",
    "MLP",
    "Experts",
    "apply_expert_parallel",
    "expert_parallel_layers",
    "sharded_expert_names",
    "gather_expert_state",
    "shard_model_state",
]
