"""The MLLP listener source: one asyncio server per channel."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.hl7 import mllp
from engine.runtime.registry import Registry


class TLSConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cert: str
    key: str
    ca: str | None = None  # required with require_client_cert (mutual TLS)
    require_client_cert: bool = False


class MLLPSourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = "mllp"
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)
    max_frame_bytes: int = Field(16 * 2**20, ge=1024)
    read_timeout: float = Field(30.0, gt=0)  # a started frame must finish within this
    idle_timeout: float | None = 600.0  # close a silent connection after this
    max_connections: int = Field(256, ge=1)
    keepalive: bool = True
    commit_ack: bool = False  # MLLP release 2: answer with a single ACK/NAK byte
    tls: TLSConfig | None = None


class MLLPSource:
    Config = MLLPSourceConfig

    def __init__(self, config: MLLPSourceConfig, handler: Callable[[bytes, Any], Awaitable[bytes | None]]) -> None:
        self.config = config
        self.handler = handler
        self.server: Any = None

    @property
    def port(self) -> int:
        return int(self.server.port) if self.server is not None else self.config.port

    async def start(self) -> None:
        cfg = self.config
        ssl = None
        if cfg.tls is not None:
            ssl = mllp.server_ssl_context(cfg.tls.cert, cfg.tls.key, cfg.tls.ca, cfg.tls.require_client_cert)
        self.server = await mllp.start_server(
            self.handler,
            cfg.host,
            cfg.port,
            ssl=ssl,
            max_frame=cfg.max_frame_bytes,
            read_timeout=cfg.read_timeout,
            idle_timeout=cfg.idle_timeout,
            max_connections=cfg.max_connections,
            keepalive=cfg.keepalive,
        )

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None


def register(registry: Registry) -> None:
    registry.add_source("mllp", MLLPSource)
