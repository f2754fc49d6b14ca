"""The channel pipeline: the synchronous stage every input kind goes through.

A source hands over raw bytes; the channel's input adapter parses them and says what they are;
the pipeline checks the type against `accept`, filters, maps, routes the outputs to the
destinations and hands one `WorkUnit` to the writer. The raw bytes are stored whatever happens;
the answer is built by the adapter and returned as an `Outcome` only once the unit is committed.
Nothing here knows a protocol: HL7 sits in `engine.hl7.adapter`, the reply in each source.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection

from engine.errors import UNSUPPORTED_MESSAGE_TYPE, ProcessingError, ProcessingWarning
from engine.inputs import AnswerBuilder, InputAdapter, Outcome, Received
from engine.runtime.config import ChannelSpec
from engine.runtime.destinations.base import (
    RAW,
    Destination,
    Emitted,
    LocalDestination,
    MessageContext,
    QueuedDestination,
    raw_of,
)
from engine.runtime.registry import Registry
from engine.store.models import MessageStatus, utcnow
from engine.store.writer import QueuedPayload, UnitResult, WorkUnit, Writer, body_hash

log = logging.getLogger(__name__)

Effects = Callable[[Connection, int], list[QueuedPayload]]
WriterAnswer = Callable[[str, ProcessingError | None], str]


class Pipeline:
    def __init__(self, spec: ChannelSpec, adapter: InputAdapter, destinations: list[Destination], writer: Writer):
        self.spec = spec
        self.name = spec.config.name
        self._adapter = adapter
        self.destinations = [d for d in destinations if d.config.enabled]
        self.writer = writer
        self.accept = set(spec.config.accept)
        self.filter_types = set(spec.config.filter.types)
        self.has_queued = any(isinstance(d, QueuedDestination) for d in self.destinations)
        self._queued_names = {d.name for d in self.destinations if isinstance(d, QueuedDestination)}
        # queued destinations a local one emits to (C2) that cannot take this channel's units
        # themselves (an mllp destination on a dicom channel): they get only what is emitted
        fed = {n for d in self.destinations if isinstance(d, LocalDestination) for n in type(d).emits(d.config)}
        own = {RAW, raw_of(spec.input.type)}
        self._fed = {d.name for d in self.destinations if d.name in fed and not own & type(d).takes(d.config)}
        self.on_queued: Callable[[], None] | None = None  # wakes the delivery worker

    @classmethod
    def build(cls, spec: ChannelSpec, registry: Registry, writer: Writer, base_dir: Path | None) -> Pipeline:
        """The one place a channel's adapter and destinations are made (the app and replay use it)."""
        destinations = [registry.build_destination(d, base_dir) for d in spec.destinations]
        return cls(spec, registry.build_adapter(spec.input), destinations, writer)

    @property
    def adapter(self) -> InputAdapter:
        return self._adapter

    async def receive(
        self, raw: bytes, *, replay_of: int | None = None, refusal: ProcessingError | None = None
    ) -> Outcome:
        """`refusal`: the source found the unit wrong for how it came (an HTTP URL naming another
        resource than its body): stored as received, as an error, and answered with it."""
        unit, encoding = self.prepare(raw, refusal)
        unit.replay_of = replay_of
        if replay_of is not None:
            unit.dedupe = False
        result = await self.writer.submit(unit)
        self._log(unit, result)
        if self.on_queued is not None and self.has_queued and result.status == MessageStatus.PROCESSED:
            self.on_queued()  # deliver now rather than at the next poll
        return Outcome(
            status=result.status,
            message_id=result.message_id,
            answer=result.answer,
            error=result.error,
            warnings=unit.warnings,
            duplicate_of=result.duplicate_of,
            flags=result.flags,
            encoding=encoding,
        )

    def prepare(self, raw: bytes, refusal: ProcessingError | None = None) -> tuple[WorkUnit, str]:
        """Everything that needs no database: runs on the event loop, never raises."""
        received_at = utcnow()
        try:
            parsed = self._adapter.parse(raw)
        except ProcessingError as exc:
            builder, encoding = self._adapter.refusal(raw)
            unit = WorkUnit(self.name, raw, received_at, error=exc, dedupe=False)
            unit.answer = _bind(builder, unit.warnings)
            return unit, encoding
        unit = WorkUnit(
            channel=self.name,
            raw=raw,
            received_at=received_at,
            control_id=parsed.control_id,
            message_type=parsed.message_type,
            patient_id=parsed.patient_id,
            sender=parsed.sender,
            dedupe=self.spec.config.dedupe.enabled,
            body_hash=body_hash(raw),
            warnings=list(parsed.warnings),
        )
        unit.answer = _bind(self._adapter.answer(parsed), unit.warnings)
        if refusal is not None:
            unit.error = refusal
            return unit, parsed.encoding
        try:
            self._check(parsed)
            if self._passes_filter(parsed):
                unit.effects = self._effects(parsed, raw, received_at, unit.warnings)
            else:
                unit.status = MessageStatus.FILTERED
        except ProcessingError as exc:
            unit.error = exc
        except Exception as exc:  # a bug in a rule must not take the listener down
            log.exception("channel %s: mapping failed for control id %s", self.name, parsed.control_id)
            unit.error = ProcessingError(f"internal error while mapping: {type(exc).__name__}")
        if unit.error is None:  # built here, on the event loop, to keep the writer thread lean
            unit.success_answer = unit.answer(unit.status, None)
        return unit, parsed.encoding

    # -- stages ------------------------------------------------------------------------------
    def _check(self, parsed: Received) -> None:
        self._adapter.check(parsed)
        if self.accept and parsed.message_type not in self.accept:
            raise ProcessingError(
                f"message type {parsed.message_type or '(empty)'} is not accepted on channel {self.name}",
                UNSUPPORTED_MESSAGE_TYPE,
                self._adapter.type_location,
                ack_code="AR",
            )

    def _passes_filter(self, parsed: Received) -> bool:
        if self.filter_types and parsed.message_type not in self.filter_types:
            return False
        return all(cond(parsed.view) for cond in self.spec.filter_conditions)

    def _effects(
        self, parsed: Received, raw: bytes, received_at: Any, warnings: list[ProcessingWarning]
    ) -> Effects | None:
        mtype = parsed.message_type
        mapping = self.spec.mappings.get(mtype) or self.spec.mappings.get("*")
        outputs: list[Any] = mapping.run(parsed.view, warnings) if mapping is not None else []
        targets = [d for d in self.destinations if not d.config.types or mtype in d.config.types]
        if not targets:
            return None
        ctx = MessageContext(
            channel=self.name,
            raw=raw,
            view=parsed.view,
            message_type=mtype,
            control_id=parsed.control_id,
            patient_id=parsed.patient_id,
            received_at=received_at,
            content_type=self._adapter.content_type,
        )
        payloads = [
            QueuedPayload(d.name, p.body, p.ordering_key, p.content_type)
            for d in targets
            if isinstance(d, QueuedDestination) and d.name not in self._fed
            for p in d.payloads(ctx, outputs)
        ]
        local = [d for d in targets if isinstance(d, LocalDestination)]
        for dest in local:  # their database-free part, here on the event loop, not in the writer
            dest.prepare(ctx, outputs)
        queued = self._queued_names

        def effects(conn: Connection, message_id: int) -> list[QueuedPayload]:
            ctx.message_id = message_id
            emitted: list[Emitted] = []
            for dest in local:
                emitted += dest.apply(conn, ctx, outputs) or []
            if not emitted:
                return payloads
            # a disabled destination is left out like any other (its name was checked at load)
            return payloads + [
                QueuedPayload(e.destination, e.body, e.ordering_key, e.content_type)
                for e in emitted
                if e.destination in queued
            ]

        return effects

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
        elif unit.warnings:
            log.info(
                "channel=%s id=%s control_id=%s type=%s status=%s warnings=%s",
                self.name,
                result.message_id,
                unit.control_id,
                unit.message_type,
                result.status,
                ",".join(w.location or w.target for w in unit.warnings),
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


def _bind(builder: AnswerBuilder, warnings: Sequence[ProcessingWarning]) -> WriterAnswer:
    """The writer asks for an answer by (status, error); the unit's warnings ride along."""

    def answer(status: str, error: ProcessingError | None) -> str:
        return builder(status, error, warnings)

    return answer
