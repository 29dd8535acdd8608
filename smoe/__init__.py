"""smoe: sparse Mixture-of-Experts for PyTorch.

Every router returns a routing plan; one engine moves tokens to experts and back.

>>> import torch, smoe
>>> layer = smoe.MoE(dim=64, hidden_dim=128, num_experts=8, top_k=2)
>>> y, aux = layer(torch.randn(4, 16, 64))
>>> y.shape
torch.Size([4, 16, 64])
"""

from smoe.engine import BACKENDS, get_backend, run_plan, set_backend, use_backend
from smoe.layers import MLP, Experts, MoE, MoEAux
from smoe.models.presets import build_model, get_preset, list_presets
from smoe.routing import (
    DensePlan,
    Router,
    RouterOutput,
    RoutingContext,
    SparsePlan,
    build_router,
    get_router,
    list_routers,
    register_bias_update_hook,
    register_router,
    update_expert_bias,
)

__version__ = "0.1.0"

__all__ = [
    "MoE",
    "MoEAux",
    "Experts",
    "MLP",
    "Router",
    "RouterOutput",
    "RoutingContext",
    "SparsePlan",
    "DensePlan",
    "register_router",
    "get_router",
    "list_routers",
    "build_router",
    "update_expert_bias",
    "register_bias_update_hook",
    "run_plan",
    "BACKENDS",
    "set_backend",
    "get_backend",
    "use_backend",
    "build_model",
    "list_presets",
    "get_preset",
    "__version__",
]
