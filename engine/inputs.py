"""What every input kind is: the contract between a protocol and the channel pipeline.

The pipeline (`engine.runtime.pipeline`) knows nothing of HL7, FHIR or DICOM. For each input kind
(`hl7v2`, `fhir`, `dicom` ...) one *adapter* parses raw bytes into its view, says the unit's
identity, runs its protocol's own checks and turns an `Outcome` into that protocol's answer
(an HL7 ACK, an OperationOutcome, a DICOM status). Adapters live with their protocol
(`engine/hl7/adapter.py`) and import only this module and `engine.errors`, so the protocol
packages stay independent of each other and of the runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from engine.errors import ProcessingError, ProcessingWarning

# the outcome a stored answer is built for: (status, error or None, warnings) -> answer text
AnswerBuilder = Callable[[str, ProcessingError | None, Sequence[ProcessingWarning]], str]


class AdapterOptions(BaseModel):
    """The channel's `input:` block; each adapter subclasses it with its own keys."""

    model_config = ConfigDict(extra="forbid")

    type: str


class View(Protocol):
    """A parsed unit as rules and filters read it: a value by path ("PID-3.1", "status")."""

    def get(self, path: str) -> str: ...


@dataclass
class Received:
    """One unit an adapter has parsed: its view and what identifies it in the store."""

    view: View
    message_type: str  # "ORM^O01", "MedicationRequest", "MPPS N-CREATE" ...
    control_id: str  # the sender's id of this unit (MSH-10, a resource id ...); the dedupe key
    sender: str = ""  # who sent it (MSH-3|MSH-4, a client address): dedupe is per sender
    patient_id: str = ""
    encoding: str = "utf-8"  # how the answer goes back on the wire
    warnings: list[ProcessingWarning] = field(default_factory=list)  # found while parsing


@dataclass
class Outcome:
    """What became of one received unit, after commit: every source turns it into its answer."""

    status: str  # engine.store.models.MessageStatus
    message_id: int
    answer: str = ""  # the protocol answer as stored with the message ("" when none is due)
    error: ProcessingError | None = None
    warnings: list[ProcessingWarning] = field(default_factory=list)
    duplicate_of: int | None = None
    flags: str = ""
    encoding: str = "utf-8"

    @property
    def failed(self) -> bool:
        return self.error is not None

    def answer_bytes(self) -> bytes:
        return self.answer.encode(self.encoding, errors="replace")


class InputAdapter(Protocol):
    """One input kind. `name` is what a channel's `input:` and a mapping's `input:` say."""

    name: ClassVar[str]
    Options: ClassVar[type[AdapterOptions]]
    content_type: ClassVar[str]  # of the raw unit, for the `file` destination and deliveries
    type_location: ClassVar[str]  # where a refused message type is reported (HL7: "MSH-9")

    def __init__(self, options: AdapterOptions) -> None: ...

    def parse(self, raw: bytes) -> Received:
        """Parse or raise ProcessingError; must not raise anything else."""
        ...

    def check(self, unit: Received) -> None:
        """The protocol's own checks (an empty MSH-10, structure validation); raise to refuse."""
        ...

    def answer(self, unit: Received) -> AnswerBuilder:
        """How to answer this unit, whatever its outcome."""
        ...

    def refusal(self, raw: bytes) -> tuple[AnswerBuilder, str]:
        """How to answer bytes that did not parse, and in which encoding."""
        ...

    def split(self, raw: bytes) -> list[bytes] | None:
        """Several units in one transport frame (an HL7 batch): the parts; else None."""
        ...

    def combine(self, outcomes: Sequence[Outcome]) -> bytes:
        """The one answer for a frame that held several units."""
        ...

