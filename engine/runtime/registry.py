"""Sources and destinations are registered by name; a channel file picks them with `type:`.

The registry is an object (tests can build an empty one), filled explicitly by
`default_registry()` rather than by import side effects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T", bound=type)


class Registry:
    def __init__(self) -> None:
        self.sources: dict[str, type] = {}
        self.destinations: dict[str, type] = {}

    def source(self, name: str) -> Callable[[T], T]:
        def register(cls: T) -> T:
            self.sources[name] = cls
            return cls

        return register

    def destination(self, name: str) -> Callable[[T], T]:
        def register(cls: T) -> T:
            self.destinations[name] = cls
            return cls

        return register

    def add_destination(self, name: str, cls: Any) -> None:
        self.destinations[name] = cls

    def add_source(self, name: str, cls: Any) -> None:
        self.sources[name] = cls
