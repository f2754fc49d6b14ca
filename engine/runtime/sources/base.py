"""What every source is: it listens (or polls), hands each received unit to its channel's
pipeline and owns the reply: MLLP answers with an ACK or a commit byte, HTTP with a status code
and an OperationOutcome, DICOM with a status.

A source never decides what a unit means; the pipeline and the input adapter do. Constructors do
no I/O; `start()` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from engine.errors import ProcessingError
from engine.inputs import InputAdapter, Outcome


@dataclass(frozen=True)
class Endpoint:
    """Where a source listens: two enabled listeners on one (host, port) are a configuration error."""

    protocol: str  # "mllp", "http", "dicom" ...
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.protocol}://{self.host}:{self.port}"


class SourceConfig(BaseModel):
    """Keys every source accepts; each source subclasses this with its own."""

    model_config = ConfigDict(extra="forbid")

    type: str

    def endpoints(self) -> list[Endpoint]:
        """The endpoints this configuration asks for (a port of 0 means "any free one")."""
        return []


class Receiver(Protocol):
    """What a source hands its units to: the channel's pipeline."""

    @property
    def adapter(self) -> InputAdapter: ...

    async def receive(
        self, raw: bytes, *, replay_of: int | None = None, refusal: ProcessingError | None = None
    ) -> Outcome: ...


class Source(Protocol):
    Config: ClassVar[type[SourceConfig]]
    default_input: ClassVar[str]  # the input kind a channel gets when its file names none

    def __init__(self, config: SourceConfig, receiver: Receiver) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def endpoints(self) -> list[Endpoint]:
        """Where it listens now (the bound port once started)."""
        ...
