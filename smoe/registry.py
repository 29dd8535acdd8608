"""String registries: ``register`` / ``get`` / ``names``, one class for the routers, expert types and dispatchers.

Each registry maps a name to a class; registering sets the class attribute ``registry_name``, so that an instance
can say what it is (``router.name`` in messages). Lookups of an unknown name raise a ``ValueError`` that lists the
valid names (house style rule 18). This module imports nothing from the package, so every layer may use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Names to classes, for one kind of component.

    Args:
        kind: what is registered, as messages name it (``"router"``, ``"expert type"``, ``"dispatcher"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator registering ``cls`` under ``name`` (and setting ``cls.registry_name``)."""

        def deco(cls: T) -> T:
            if name in self._entries and self._entries[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered to {self._entries[name].__name__}")
            self._entries[name] = cls
            cls.registry_name = name
            return cls

        return deco

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The class registered under ``name``; ``ValueError`` listing the valid names otherwise."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of {self.names()}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries
