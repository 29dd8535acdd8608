"""Weight exchange with other libraries' MoE blocks (optional dependencies, imported lazily)."""

from smoe.interop.mixtral import from_mixtral_block, to_mixtral_block

__all__ = ["to_mixtral_block", "from_mixtral_block"]
