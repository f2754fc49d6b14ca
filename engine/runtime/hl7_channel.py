"""The synchronous stage of an HL7 v2 channel: parse, check, filter, map, then hand the message
and its effects to the writer as one unit, and answer only once that unit is committed.

Every refusal is a `ProcessingError`; this module turns it into the right answer for the ack
mode the sender asked for (original AA/AE/AR, enhanced CA/CE/CR, or an MLLP release 2 commit
byte). The answer is stored with the message, so a resend gets exactly the same one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection

from engine.errors import UNSUPPORTED_MESSAGE_TYPE, ProcessingError
from engine.hl7.ack import ack_mode, build_ack, build_ack_from_raw, should_send
from engine.hl7.batch import split_batch_bytes
from engine.hl7.er7 import Message
from engine.hl7.mllp import COMMIT_ACK, COMMIT_NAK
from engine.hl7.validate import validate_structure
from engine.runtime.config import ChannelSpec
from engine.runtime.destinations.base import (
    Destination,
    LocalDestination,
    MessageContext,
    QueuedDestination,
)
from engine.store.models import MessageStatus, utcnow
from engine.store.writer import QueuedPayload, UnitResult, WorkUnit, Writer, body_hash

log = logging.getLogger(__name__)

# the header an answer is built from when the frame had no readable MSH
_UNKNOWN_SENDER = Message.parse("MSH|^~\\&|||||||||P|2.5\r")


class HL7Channel:
    def __init__(self, spec: ChannelSpec, destinations: list[Destination], writer: Writer) -> None:
        self.spec = spec
        self.cfg = spec.config
        self.name = spec.config.name
        self.destinations = [d for d in destinations if d.config.enabled]
        self.writer = writer
        self.commit_ack_only = bool(getattr(spec.source, "commit_ack", False))
        self.accept = set(self.cfg.accept)
        self.filter_types = set(self.cfg.filter.types)
        self.has_queued = any(isinstance(d, QueuedDestination) for d in self.destinations)
        self.on_queued: Callable[[], None] | None = None  # wakes the delivery worker

    # -- the MLLP handler --------------------------------------------------------------------
    async def handle_frame(self, frame: bytes, _conn: Any = None) -> bytes | None:
        if frame.lstrip()[:3] in (b"FHS", b"BHS"):
            return await self._handle_batch(frame)
        result, encoding = await self.receive(frame)
        if self.commit_ack_only:
            return COMMIT_ACK if result.status != MessageStatus.ERROR else COMMIT_NAK
        if not result.answer:
            return None
        return result.answer.encode(encoding, errors="replace")

    async def _handle_batch(self, frame: bytes) -> bytes | None:
        """An HL7 batch in one frame: each message is stored and processed on its own, in order,
        and the answer is a batch of their ACKs (BHS, the ACKs, BTS with the count)."""
        messages = split_batch_bytes(frame)
        outcomes = await asyncio.gather(*(self.receive(m) for m in messages))
        if self.commit_ack_only:
            failed = any(r.status == MessageStatus.ERROR for r, _ in outcomes)
            return COMMIT_NAK if failed else COMMIT_ACK
        acks = [r.answer.encode(enc, errors="replace") for r, enc in outcomes if r.answer]
        return b"BHS|^~\\&|ENGINE\r" + b"".join(acks) + f"BTS|{len(acks)}\r".encode()

    async def receive(self, raw: bytes, *, replay_of: int | None = None) -> tuple[UnitResult, str]:
        unit, encoding = self.prepare(raw)
        unit.replay_of = replay_of
        if replay_of is not None:
            unit.dedupe = False
        result = await self.writer.submit(unit)
        self._log(unit, result)
        if self.on_queued is not None and self.has_queued and result.status == MessageStatus.PROCESSED:
            self.on_queued()  # deliver now rather than at the next poll
        return result, encoding

    def prepare(self, raw: bytes) -> tuple[WorkUnit, str]:
        """Everything that needs no database: runs on the event loop, never raises."""
        received_at = utcnow()
        try:
            msg = Message.parse(raw, charset=self.cfg.charset)
        except ProcessingError as exc:
            unit = WorkUnit(self.name, raw, received_at, error=exc, dedupe=False)
            unit.answer = self._raw_answer(raw)
            return unit, "latin-1"
        encoding = msg.codec  # the ACK goes back in the charset the message came in
        unit = WorkUnit(
            channel=self.name,
            raw=raw,
            received_at=received_at,
            control_id=msg.control_id,
            message_type=msg.message_type,
            patient_id=msg.get("PID-3.1"),
            sender=f"{msg.sending_application}|{msg.sending_facility}",
            dedupe=self.cfg.dedupe.enabled,
            body_hash=body_hash(raw),
        )
        unit.answer = self._answer(msg)
        try:
            self._check(msg)
            if self._passes_filter(msg):
                unit.effects = self._effects(msg, raw, received_at)
            else:
                unit.status = MessageStatus.FILTERED
        except ProcessingError as exc:
            unit.error = exc
        except Exception as exc:  # a bug in a rule must not take the listener down
            log.exception("channel %s: mapping failed for control id %s", self.name, msg.control_id)
            unit.error = ProcessingError(f"internal error while mapping: {type(exc).__name__}")
        if unit.error is None:  # built here, on the event loop, to keep the writer thread lean
            unit.success_answer = unit.answer(unit.status, None)
        return unit, encoding

    # -- stages ------------------------------------------------------------------------------
    def _check(self, msg: Message) -> None:
        if not msg.control_id:
            raise ProcessingError("MSH-10 (message control id) is empty", 101, "MSH-10")
        if self.accept and msg.message_type not in self.accept:
            raise ProcessingError(
                f"message type {msg.message_type or '(empty)'} is not accepted on channel {self.name}",
                UNSUPPORTED_MESSAGE_TYPE,
                "MSH-9",
                ack_code="AR",
            )
        if self.cfg.validate_structure:
            problems = validate_structure(msg)
            if problems:
                raise problems[0]

    def _passes_filter(self, msg: Message) -> bool:
        if self.filter_types and msg.message_type not in self.filter_types:
            return False
        return all(cond(msg) for cond in self.spec.filter_conditions)

    def _effects(
        self, msg: Message, raw: bytes, received_at: Any
    ) -> Callable[[Connection, int], list[QueuedPayload]] | None:
        mapping = self.spec.mappings.get(msg.message_type) or self.spec.mappings.get("*")
        outputs: list[Any] = mapping.run(msg) if mapping is not None else []
        targets = [d for d in self.destinations if not d.config.types or msg.message_type in d.config.types]
        if not targets:
            return None
        ctx = MessageContext(self.name, raw, msg, msg.message_type, msg.control_id, received_at)
        queued = [d for d in targets if isinstance(d, QueuedDestination)]
        payloads = [
            QueuedPayload(d.name, p.body, p.ordering_key, p.content_type)
            for d in queued
            for p in d.payloads(ctx, outputs)
        ]
        local = [d for d in targets if isinstance(d, LocalDestination)]

        def effects(conn: Connection, message_id: int) -> list[QueuedPayload]:
            ctx.message_id = message_id
            for dest in local:
                dest.apply(conn, ctx, outputs)
            return payloads

        return effects

    # -- answers -----------------------------------------------------------------------------
    def _answer(self, msg: Message) -> Callable[[str, ProcessingError | None], str]:
        """Original mode: AA/AE/AR. Enhanced mode (MSH-15/16 set): the commit ACK (CA/CE/CR) when
        MSH-15 asks for one; otherwise the application ACK when MSH-16 asks for one, on the same
        connection (the engine's application work is done by commit time); otherwise nothing."""
        mode = ack_mode(msg)

        def answer(status: str, error: ProcessingError | None) -> str:
            ok = error is None
            if mode.original:
                return build_ack(msg, "AA" if error is None else error.ack_code, error)
            if should_send(mode.commit, ok):
                code = "CA" if error is None else ("CR" if error.ack_code == "AR" else "CE")
                return build_ack(msg, code, error)
            if should_send(mode.application, ok):
                return build_ack(msg, "AA" if error is None else error.ack_code, error)
            return ""

        return answer

    @staticmethod
    def _raw_answer(raw: bytes) -> Callable[[str, ProcessingError | None], str]:
        def answer(_status: str, error: ProcessingError | None) -> str:
            if error is None:  # pragma: no cover - a unit that failed to parse always has an error
                return ""
            # no readable MSH: still answer, so the sender is not left waiting for a timeout
            return build_ack_from_raw(raw, error.ack_code, error) or build_ack(_UNKNOWN_SENDER, "AR", error)

        return answer

    def _log(self, unit: WorkUnit, result: UnitResult) -> None:
        if result.status == MessageStatus.ERROR and result.error is not None:
            log.warning(
                "channel=%s id=%s control_id=%s type=%s status=error code=%s location=%s",
                self.name,
                result.message_id,
                unit.control_id,
                unit.message_type,
                result.error.code,
                result.error.location,
            )
        elif log.isEnabledFor(logging.DEBUG):
            log.debug(
                "channel=%s id=%s control_id=%s type=%s status=%s",
                self.name,
                result.message_id,
                unit.control_id,
                unit.message_type,
                result.status,
            )
