"""The MLLP listener source: one asyncio server per channel.

It owns the reply: the adapter's answer (an ACK) for each frame, a batch of answers for a batch
frame, or, with `commit_ack` (MLLP release 2), a single ACK/NAK byte. Every frame is answered:
a frame refused for the buffer budget gets AR with ERR 207 "engine busy", and a frame whose
answer could not be built (a bug) gets a plain AR while the connection stays open.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from engine.hl7 import ack, mllp
from engine.inputs import Outcome
from engine.runtime.registry import Registry
from engine.runtime.sources.base import Endpoint, Receiver, SourceConfig


class TLSConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cert: str
    key: str
    ca: str | None = None  # required with require_client_cert (mutual TLS)
    require_client_cert: bool = False


class MLLPSourceConfig(SourceConfig):
    type: str = "mllp"
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)
    max_frame_bytes: int = Field(16 * 2**20, ge=1024)
    read_timeout: float = Field(30.0, gt=0)  # a started frame must finish within this
    idle_timeout: float | None = 600.0  # close a silent connection after this
    max_connections: int = Field(256, ge=1)  # at the limit, the connection idle longest makes room
    max_junk_bytes: int = Field(mllp.DEFAULT_MAX_JUNK, ge=0)  # bytes outside any frame before closing
    # frame bytes held by all MLLP connections of the process (the smallest value of all sources applies)
    max_buffered_bytes: int = Field(mllp.DEFAULT_MAX_BUFFERED, ge=1024)
    keepalive: bool = True
    commit_ack: bool = False  # MLLP release 2: answer with a single ACK/NAK byte
    tls: TLSConfig | None = None

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("mllp", self.host, self.port)]


class MLLPSource:
    Config: ClassVar[type[SourceConfig]] = MLLPSourceConfig
    default_input: ClassVar[str] = "hl7v2"

    def __init__(self, config: SourceConfig, receiver: Receiver) -> None:
        assert isinstance(config, MLLPSourceConfig)
        self.config = config
        self.receiver = receiver
        self.server: Any = None

    @property
    def port(self) -> int:
        return int(self.server.port) if self.server is not None else self.config.port

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("mllp", self.config.host, self.port)]

    async def handle_frame(self, frame: bytes, _conn: Any = None) -> bytes | None:
        adapter = self.receiver.adapter
        parts = adapter.split(frame)
        if parts is None:
            outcome = await self.receiver.receive(frame)
            if self.config.commit_ack:
                return mllp.COMMIT_NAK if outcome.failed else mllp.COMMIT_ACK
            return outcome.answer_bytes() if outcome.answer else None
        # a batch in one frame: each unit is stored and processed on its own, in order
        outcomes: list[Outcome] = list(await asyncio.gather(*(self.receiver.receive(p) for p in parts)))
        if self.config.commit_ack:
            return mllp.COMMIT_NAK if any(o.failed for o in outcomes) else mllp.COMMIT_ACK
        return adapter.combine(outcomes)

    async def start(self) -> None:
        cfg = self.config
        ssl = None
        if cfg.tls is not None:
            ssl = mllp.server_ssl_context(cfg.tls.cert, cfg.tls.key, cfg.tls.ca, cfg.tls.require_client_cert)
        self.server = await mllp.start_server(
            self.handle_frame,
            cfg.host,
            cfg.port,
            ssl=ssl,
            max_frame=cfg.max_frame_bytes,
            read_timeout=cfg.read_timeout,
            idle_timeout=cfg.idle_timeout,
            max_connections=cfg.max_connections,
            keepalive=cfg.keepalive,
            max_junk=cfg.max_junk_bytes,
            max_buffered=cfg.max_buffered_bytes,
            busy=self._busy,
            fallback=self._fallback,
        )

    def _busy(self, head: bytes) -> bytes:
        return mllp.COMMIT_NAK if self.config.commit_ack else ack.busy_ack(head)

    def _fallback(self, frame: bytes) -> bytes:
        return mllp.COMMIT_NAK if self.config.commit_ack else ack.fallback_ack(frame)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None


def register(registry: Registry) -> None:
    registry.add_source("mllp", MLLPSource)
