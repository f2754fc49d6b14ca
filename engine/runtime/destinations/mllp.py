"""Forward to another MLLP endpoint and read its ACK.

`AA`/`CA` is success. `AR`/`CR` (the receiver could not take it now) and an ACK timeout are
retried with back-off: a timeout is "unknown", so the next copy waits for the back-off instead of
flooding the receiver. `AE`/`CE` means the receiver will never accept this message: the delivery
goes `dead` with the ERR text, for an operator to fix and replay.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, Literal

from pydantic import Field

from engine.hl7 import mllp
from engine.hl7.er7 import Message
from engine.runtime.destinations.base import (
    DeliveryOutcome,
    DestinationConfig,
    MessageContext,
    Payload,
    QueuedDestination,
    raw_of,
)
from engine.runtime.registry import Registry
from engine.runtime.sources.mllp import TLSConfig


class MLLPDestinationConfig(DestinationConfig):
    host: str
    port: int = Field(ge=1, le=65535)
    connect_timeout: float = 10.0
    ack_timeout: float = 30.0
    order_by: Literal["destination", "patient", "none"] = "destination"
    tls: TLSConfig | None = None


class MLLPDestination(QueuedDestination):
    Config: ClassVar[type[DestinationConfig]] = MLLPDestinationConfig
    config: MLLPDestinationConfig

    @classmethod
    def takes(cls, config: DestinationConfig) -> frozenset[str]:
        """It forwards the received ER7 as it came: only from an hl7v2 channel."""
        return frozenset({raw_of("hl7v2")})

    def __init__(self, config: DestinationConfig, *, base_dir: Any = None) -> None:
        super().__init__(config, base_dir=base_dir)
        self.client: mllp.MLLPClient | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        cfg = self.config
        ssl = None
        if cfg.tls is not None:
            ssl = mllp.client_ssl_context(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
        self.client = mllp.MLLPClient(
            cfg.host, cfg.port, ssl=ssl, connect_timeout=cfg.connect_timeout, read_timeout=cfg.ack_timeout
        )

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()

    def payloads(self, ctx: MessageContext, outputs: list[Any]) -> list[Payload]:
        key = {"destination": "", "patient": ctx.patient_id, "none": ctx.control_id}
        return [Payload(ctx.raw, ordering_key=key[self.config.order_by], content_type=ctx.content_type)]

    async def deliver(self, payload: Payload) -> DeliveryOutcome:
        if self.client is None:
            await self.start()
        assert self.client is not None
        sent = Message.parse(payload.body)
        async with self._lock:  # one message in flight to this receiver
            try:
                reply = await self.client.send(payload.body)
            except mllp.MLLPTimeout:
                return DeliveryOutcome(ok=False, retry=True, error="no ACK within the timeout (outcome unknown)")
            except (mllp.MLLPError, OSError) as exc:
                return DeliveryOutcome(ok=False, retry=True, error=f"not delivered: {type(exc).__name__}: {exc}")
        return judge_ack(sent.control_id, reply)


def judge_ack(control_id: str, reply: bytes) -> DeliveryOutcome:
    text = reply.decode("latin-1", errors="replace")
    try:
        ack = Message.parse(reply)
    except Exception:
        return DeliveryOutcome(ok=False, retry=True, response=text[:500], error="reply is not an HL7 ACK")
    code, acked = ack.get("MSA-1"), ack.get("MSA-2")
    if acked != control_id:
        return DeliveryOutcome(
            ok=False, retry=True, response=text, error=f"ACK answers control id {acked!r}, not {control_id!r}"
        )
    if code in ("AA", "CA"):
        return DeliveryOutcome(ok=True, response=text)
    reason = ack.get("ERR-8") or ack.get("ERR-3.2") or ack.get("MSA-3") or code
    if code in ("AR", "CR"):
        return DeliveryOutcome(ok=False, retry=True, response=text, error=f"{code}: {reason}")
    return DeliveryOutcome(ok=False, retry=False, response=text, error=f"{code}: {reason}")


def register(registry: Registry) -> None:
    registry.add_destination("mllp", MLLPDestination)
