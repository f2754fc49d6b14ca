"""The `http` source: a channel that takes FHIR over the engine's one HTTP listener.

It opens no socket of its own: it registers its channel with the shared `HttpApp`
(engine.runtime.http_app), which the engine starts once for every HTTP source, so several HTTP
channels share one port and are not a port clash. The HTTP app owns the reply (status code and
OperationOutcome or the resource, from the adapter's stored answer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from engine.runtime.registry import Registry
from engine.runtime.sources.base import Endpoint, Receiver, SourceConfig

if TYPE_CHECKING:
    from engine.runtime.http_app import HttpApp


class HttpSourceConfig(SourceConfig):
    type: str = "http"
    max_body_bytes: int | None = Field(None, ge=1024)  # this channel's limit; default engine.yaml http.max_body_bytes

    def endpoints(self) -> list[Endpoint]:
        return []  # the shared listener is engine.yaml's http block, counted once


class HttpSource:
    Config: ClassVar[type[SourceConfig]] = HttpSourceConfig
    default_input: ClassVar[str] = "fhir"
    uses_http_app: ClassVar[bool] = True  # the engine binds it to its HTTP app before start()

    def __init__(self, config: SourceConfig, receiver: Receiver) -> None:
        assert isinstance(config, HttpSourceConfig)
        self.config = config
        self.receiver = receiver
        self.http: HttpApp | None = None
        self.channel = ""

    def bind_http(self, http: HttpApp, channel: str) -> None:
        self.http, self.channel = http, channel

    async def start(self) -> None:
        if self.http is None:
            raise RuntimeError("the http source needs the engine's HTTP listener (engine.yaml http.enabled: true)")
        self.http.add_channel(self.channel, self.receiver, self.config.max_body_bytes)

    async def stop(self) -> None:
        if self.http is not None:
            self.http.remove_channel(self.channel)

    def endpoints(self) -> list[Endpoint]:
        return [self.http.endpoint()] if self.http is not None else []


def register(registry: Registry) -> None:
    registry.add_source("http", HttpSource)
