"""smoe: sparse Mixture-of-Experts for PyTorch.

Every router returns a routing plan; one engine moves tokens to experts and back; the experts compute themselves:
router -> plan -> dispatch -> experts -> combine.

>>> import torch, smoe
>>> layer = smoe.MoE(dim=64, hidden_dim=128, num_experts=8, top_k=2)
>>> y, aux = layer(torch.randn(4, 16, 64))
>>> y.shape
torch.Size([4, 16, 64])
"""

from smoe.engine import (
    BACKENDS,
    AllToAllDispatcher,
    Dispatcher,
    LocalDispatcher,
    get_backend,
    get_dispatcher,
    list_dispatchers,
    register_dispatcher,
    run_plan,
    set_backend,
    use_backend,
)
from smoe.experts import (
    MLP,
    Experts,
    GELUExperts,
    MLPExperts,
    ModuleExperts,
    ReLUExperts,
    SwiGLUExperts,
    build_experts,
    get_experts,
    list_experts,
    register_experts,
)
from smoe.interop import swap_router, upcycle
from smoe.layers import MoE, MoEAux
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
    "MLPExperts",
    "SwiGLUExperts",
    "GELUExperts",
    "ReLUExperts",
    "ModuleExperts",
    "register_experts",
    "get_experts",
    "list_experts",
    "build_experts",
    "MLP",
    "Dispatcher",
    "LocalDispatcher",
    "AllToAllDispatcher",
    "register_dispatcher",
    "get_dispatcher",
    "list_dispatchers",
    "swap_router",
    "upcycle",
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
    "load_run",
    "LoadedRun",
    "__version__",
]


def __getattr__(name: str):
    """``smoe.load_run`` / ``smoe.LoadedRun`` without importing the training stack at ``import smoe``."""
    if name in ("load_run", "LoadedRun"):
        from smoe.train import load  # noqa: PLC0415

        return getattr(load, name)
    raise AttributeError(f"module 'smoe' has no attribute {name!r}")
