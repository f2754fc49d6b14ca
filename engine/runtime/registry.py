"""Sources, destinations and input adapters, registered by name; a channel file picks them.

The registry is an object (tests build their own, with test-only components), filled explicitly
by each component module's `register(registry)` (see `engine.runtime.app.default_registry`),
not by import side effects. The `build_*` methods are the only places components are made.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from engine.inputs import AdapterOptions, InputAdapter

if TYPE_CHECKING:
    from engine.runtime.destinations.base import Destination, DestinationConfig
    from engine.runtime.sources.base import Receiver, Source, SourceConfig


class Registry:
    def __init__(self) -> None:
        self.sources: dict[str, type[Source]] = {}
        self.destinations: dict[str, type[Destination]] = {}
        self.adapters: dict[str, type[InputAdapter]] = {}

    def add_source(self, name: str, cls: type[Source]) -> None:
        self.sources[name] = cls

    def add_destination(self, name: str, cls: type[Destination]) -> None:
        self.destinations[name] = cls

    def add_adapter(self, cls: type[InputAdapter]) -> None:
        self.adapters[cls.name] = cls

    # -- the config models each block is validated with ----------------------------------------
    def _table(self, what: str) -> dict[str, Any]:
        tables: dict[str, dict[str, Any]] = {
            "source": self.sources,
            "destination": self.destinations,
            "input": self.adapters,
        }
        return tables[what]

    def config_model(self, what: str, name: str) -> type[BaseModel] | None:
        cls = self._table(what).get(name)
        if cls is None:
            return None
        model: type[BaseModel] = cls.Options if what == "input" else cls.Config
        return model

    def known(self, what: str) -> list[str]:
        return sorted(self._table(what))

    # -- building ------------------------------------------------------------------------------
    def build_adapter(self, options: AdapterOptions) -> InputAdapter:
        return self.adapters[options.type](options)

    def build_source(self, config: SourceConfig, receiver: Receiver) -> Source:
        return self.sources[config.type](config, receiver)

    def build_destination(self, config: DestinationConfig, base_dir: Path | None) -> Destination:
        return self.destinations[config.type](config, base_dir=base_dir)
