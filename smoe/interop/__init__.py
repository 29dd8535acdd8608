"""Interop: weight exchange with other libraries' MoE blocks (optional dependencies, imported lazily), and model
surgery on built smoe models (training-free router swaps)."""

from smoe.interop.mixtral import from_mixtral_block, to_mixtral_block
from smoe.interop.swap import swap_router

__all__ = ["to_mixtral_block", "from_mixtral_block", "swap_router"]
