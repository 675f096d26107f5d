"""Name -> object tables shared by the algorithm registries (estimators, losses, methods).

Each registry is a plain ``dict`` (so ``name in TABLE`` and ``sorted(TABLE)`` just work); these two
helpers give every registry the same behaviour: registering a name twice is an error, and looking up
an unknown name raises an error that lists the names that do exist.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """An unknown registry name. Subclasses both KeyError and ValueError so either can be caught."""

    def __str__(self) -> str:  # KeyError's str() would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


def register_into(table: dict[str, T], kind: str, name: str, obj: T) -> T:
    """Insert ``obj`` under ``name`` in ``table``; a name taken already raises ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
    if name in table:
        raise ValueError(f"{kind} {name!r} is already registered ({table[name]!r}); pick another name")
    table[name] = obj
    return obj


def lookup(table: dict[str, T], kind: str, name: Any) -> T:
    """``table[name]``, or UnknownNameError naming the known entries."""
    try:
        return table[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(table)) or "(none registered)"
        raise UnknownNameError(f"unknown {kind} {name!r}; known: {known}") from None


def decorator_into(table: dict[str, T], kind: str, name: str) -> Callable[[T], T]:
    """A decorator registering the decorated object under ``name``."""

    def deco(obj: T) -> T:
        return register_into(table, kind, name, obj)

    return deco
