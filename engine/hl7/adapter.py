"""The `hl7v2` input adapter: ER7 bytes in, an HL7 acknowledgement out.

Everything HL7 about a channel sits here: parsing with the lazy view (and MSH-18 or the channel's
charset), the unit's identity (MSH-10 per MSH-3|MSH-4), hl7apy structure validation when asked,
and the answer in the mode the sender asked for: original AA/AE/AR, or enhanced CA/CE/CR per
MSH-15 with the application ACK per MSH-16 on the same connection (the engine's application work
is done by commit time). Warnings go back as ERR segments of severity W in an AA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import ConfigDict, Field

from engine.errors import REQUIRED_FIELD_MISSING, ProcessingError, ProcessingWarning
from engine.hl7.ack import ack_codec, ack_mode, build_ack, build_ack_from_raw, check_charset, should_send
from engine.hl7.batch import split_batch_bytes
from engine.hl7.er7 import Message
from engine.hl7.validate import validate_structure
from engine.inputs import AdapterOptions, AnswerBuilder, Outcome, Received

__all__ = ["HL7Adapter", "HL7Options"]

CONTENT_TYPE = "x-application/hl7-v2+er7"

# the header an answer is built from when the frame had no readable MSH
_UNKNOWN_SENDER = Message.parse("MSH|^~\\&|||||||||P|2.5\r")


class HL7Options(AdapterOptions):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["hl7v2"] = "hl7v2"
    validate_structure: bool = Field(False, alias="validate")  # hl7apy structure validation
    charset: str | None = None  # overrides MSH-18 when a sender gets it wrong


class HL7Adapter:
    name: ClassVar[str] = "hl7v2"
    Options: ClassVar[type[AdapterOptions]] = HL7Options
    content_type: ClassVar[str] = CONTENT_TYPE
    type_location: ClassVar[str] = "MSH-9"

    def __init__(self, options: AdapterOptions) -> None:
        assert isinstance(options, HL7Options)
        self.options = options

    def parse(self, raw: bytes) -> Received:
        msg = Message.parse(raw, charset=self.options.charset)
        check_charset(msg, self.options.charset)  # MSH-18 `base64` & co: refused, as when bytes are non-ASCII
        return Received(
            view=msg,
            message_type=msg.message_type,
            control_id=msg.control_id,
            sender=f"{msg.sending_application}|{msg.sending_facility}",
            patient_id=msg.get("PID-3.1"),
            encoding=ack_codec(msg),  # the ACK goes back in the charset the bytes were decoded with
            warnings=list(msg.warnings),  # e.g. undeclared bytes read as cp1252 (MSH-18)
        )

    def check(self, unit: Received) -> None:
        if not unit.control_id:
            raise ProcessingError("MSH-10 (message control id) is empty", REQUIRED_FIELD_MISSING, "MSH-10")
        if self.options.validate_structure:
            assert isinstance(unit.view, Message)
            problems = validate_structure(unit.view)
            if problems:
                raise problems[0]

    def answer(self, unit: Received) -> AnswerBuilder:
        msg = unit.view
        assert isinstance(msg, Message)
        mode = ack_mode(msg)

        def answer(_status: str, error: ProcessingError | None, warnings: Sequence[ProcessingWarning]) -> str:
            ok = error is None
            app_code = "AA" if error is None else error.ack_code
            if mode.original:
                return build_ack(msg, app_code, error, warnings=warnings)
            if should_send(mode.commit, ok):
                code = "CA" if error is None else ("CR" if error.ack_code == "AR" else "CE")
                return build_ack(msg, code, error, warnings=warnings)
            if should_send(mode.application, ok):
                return build_ack(msg, app_code, error, warnings=warnings)
            return ""

        return answer

    def refusal(self, raw: bytes) -> tuple[AnswerBuilder, str]:
        def answer(_status: str, error: ProcessingError | None, _warnings: Sequence[ProcessingWarning]) -> str:
            if error is None:  # pragma: no cover - a unit that failed to parse always has an error
                return ""
            # no readable MSH: still answer, so the sender is not left waiting for a timeout
            return build_ack_from_raw(raw, error.ack_code, error) or build_ack(_UNKNOWN_SENDER, "AR", error)

        return answer, "latin-1"

    def split(self, raw: bytes) -> list[bytes] | None:
        """An HL7 batch (FHS/BHS ... BTS/FTS) in one frame: each message on its own; segments
        before the first MSH become a unit of their own that is stored and refused. A batch with
        no message at all is one unit, stored and refused as a whole."""
        if raw.lstrip()[:3] in (b"FHS", b"BHS"):
            return split_batch_bytes(raw, orphans=True) or None
        return None

    def combine(self, outcomes: Sequence[Outcome]) -> bytes:
        """A batch of the messages' ACKs: BHS, the ACKs, BTS with their count."""
        acks = [o.answer_bytes() for o in outcomes if o.answer]
        return b"BHS|^~\\&|ENGINE\r" + b"".join(acks) + f"BTS|{len(acks)}\r".encode()
