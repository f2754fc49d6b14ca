"""Sources and destinations are registered by name; a channel file picks them with `type:`.

The registry is an object (tests can build an empty one), filled explicitly by each component
module's `register(registry)` (see `engine.runtime.app.default_registry`), not by import side
effects.
"""

from __future__ import annotations

from typing import Any


class Registry:
    def __init__(self) -> None:
        self.sources: dict[str, type] = {}
        self.destinations: dict[str, type] = {}

    def add_destination(self, name: str, cls: Any) -> None:
        self.destinations[name] = cls

    def add_source(self, name: str, cls: Any) -> None:
        self.sources[name] = cls
