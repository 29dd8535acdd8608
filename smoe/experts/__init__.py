"""Experts: the expert types, each computing itself on rows grouped by expert (``forward(x_ND, counts_E)``).

Below the engine, above the routers: the engine moves tokens and calls the experts; the experts never see a
router. Registered types (``list_experts()``): ``swiglu`` (default), ``gelu``, ``relu`` -- stacked MLP experts
with optional biases (:mod:`smoe.experts.mlp`) -- and ``clamped_swiglu`` (GPT-OSS,
:mod:`smoe.experts.clamped_swiglu`); any ``nn.Module`` per expert through
:class:`~smoe.experts.module.ModuleExperts`. :class:`~smoe.experts.dense.MLP` is the dense MLP with the same
definition as one expert (shared experts, dense FFN blocks).
"""

from smoe.experts.activations import ACTIVATIONS, Activation, get_activation
from smoe.experts.base import Experts
from smoe.experts.clamped_swiglu import ClampedSwiGLUExperts
from smoe.experts.dense import MLP
from smoe.experts.mlp import ExpertWeights, GELUExperts, MLPExperts, ReLUExperts, SwiGLUExperts
from smoe.experts.module import ModuleExperts
from smoe.experts.registry import build_experts, get_experts, list_experts, register_experts

__all__ = [
    "Experts",
    "MLPExperts",
    "SwiGLUExperts",
    "GELUExperts",
    "ReLUExperts",
    "ClampedSwiGLUExperts",
    "ModuleExperts",
    "ExpertWeights",
    "MLP",
    "Activation",
    "ACTIVATIONS",
    "get_activation",
    "register_experts",
    "get_experts",
    "list_experts",
    "build_experts",
]
