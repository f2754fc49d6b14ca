"""What every destination is.

Two kinds:
- a *local* destination writes into the engine's own database inside the message's transaction
  (worklist rows, medication records): its effect commits together with the raw message, before
  the sender gets `AA`. It refuses a message by raising `ProcessingError`.
- a *queued* destination talks to a remote system. The synchronous stage only turns the mapped
  outputs into payloads; the store queues one delivery per payload in the same transaction, and a
  worker drains the queue later, in order per ordering key, with retries.

A local destination may also decide what a queued destination of its channel delivers (contract
C2): `apply` returns `Emitted` payloads for it, queued in the same transaction (the performed-step
store emits the RIS status message only once it knows the step's order). A destination named by
`emits()` that cannot take the channel's units (an mllp destination on a dicom channel) gets only
what is emitted to it; one that can (takes RAW) is also asked for its own `payloads()`.

Constructors do no I/O; `start()` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Connection


class DestinationConfig(BaseModel):
    """Keys every destination accepts; each destination subclasses this with its own."""

    model_config = ConfigDict(extra="forbid")

    name: str
    type: str
    enabled: bool = True
    types: list[str] = []  # message types this destination takes (empty: all the channel accepts)


@dataclass
class MessageContext:
    """One received unit as the synchronous stage hands it to destinations."""

    channel: str
    raw: bytes
    view: object  # the adapter's parsed view (an ER7 Message for hl7v2); destinations rarely need it
    message_type: str  # "ORM^O01", "ADT^A40", "MedicationRequest" ...
    control_id: str
    patient_id: str
    received_at: datetime
    content_type: str = "application/octet-stream"  # of `raw`, as the input adapter names it
    message_id: int | None = None  # set by the writer once the row exists
    prepared: dict[str, Any] = field(default_factory=dict)  # destination name -> what its `prepare` kept


@dataclass
class Payload:
    """One unit a queued destination will deliver."""

    body: bytes
    ordering_key: str = ""  # deliveries with the same key go out in id order
    content_type: str = "application/octet-stream"
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class DeliveryOutcome:
    """What a remote said. `retry` means "try again later"; neither ok nor retry means dead."""

    ok: bool
    retry: bool = False
    response: str = ""
    error: str = ""
    retry_after: float | None = None  # seconds the remote asked us to wait (HTTP Retry-After): a floor on the back-off
    # not ready yet (the PACS still lacks images): pending again in retry_after seconds, no attempt spent
    defer: bool = False


@dataclass
class Emitted:
    """A payload a local destination queues for a queued destination of the same channel."""

    destination: str
    body: bytes
    ordering_key: str = ""
    content_type: str = "application/octet-stream"


# What a destination can take: the received bytes as they came (of any input kind, or of one:
# `raw_of("hl7v2")`), or a mapping's output kind.
RAW = "raw"
OUTPUT_KINDS = frozenset({"dicom", "fhir", "json"})


def raw_of(input_kind: str) -> str:
    return f"{RAW}:{input_kind}"


class Destination:
    kind: ClassVar[str] = "local"
    Config: ClassVar[type[DestinationConfig]] = DestinationConfig

    @classmethod
    def takes(cls, config: DestinationConfig) -> frozenset[str]:
        """The mapping output kinds it consumes (`dicom`, `fhir`, `json`), or RAW / raw_of(kind)
        when it needs only the received bytes; checked against the channel at load."""
        return frozenset({RAW})

    def __init__(self, config: DestinationConfig, *, base_dir: Any = None) -> None:
        self.config = config
        self.name = config.name
        self.base_dir = base_dir

    async def start(self) -> None:  # noqa: B027 - optional hook
        pass

    async def stop(self) -> None:  # noqa: B027 - optional hook
        pass


class LocalDestination(Destination):
    kind: ClassVar[str] = "local"

    @classmethod
    def emits(cls, config: DestinationConfig) -> list[str]:
        """The queued destinations of the channel this one may emit to (checked at load)."""
        return []

    def prepare(self, ctx: MessageContext, outputs: list[Any]) -> None:  # noqa: B027 - optional hook
        """Work that needs no database, done on the event loop before the unit goes to the writer,
        so that the writer's one thread spends its time on the database; may refuse the unit
        (ProcessingError). What `apply` needs of it goes in `ctx.prepared[self.name]`; `apply`
        must still work without it (a caller that never prepared)."""

    def apply(self, conn: Connection, ctx: MessageContext, outputs: list[Any]) -> list[Emitted] | None:
        """Write the mapped outputs; runs in the writer thread inside the message's transaction.
        May return payloads for queued destinations named by `emits()`."""
        raise NotImplementedError


class QueuedDestination(Destination):
    kind: ClassVar[str] = "queued"

    def payloads(self, ctx: MessageContext, outputs: list[Any]) -> list[Payload]:
        """Turn mapped outputs into what will be delivered (cheap, no I/O)."""
        raise NotImplementedError

    async def deliver(self, payload: Payload) -> DeliveryOutcome:
        raise NotImplementedError
