"""Modality Worklist C-FIND (PS3.4 annex K, IHE RAD-5) over the worklist table.

Thin on purpose: the identifier goes to `query.find`, answers are yielded with 0xFF00 and the
handler checks `event.is_cancelled` between them. An identifier whose bytes are not a dataset gets
0xC000, an empty one or an invalid one 0xA900, anything else that raises 0xC001, a caller outside
the allowlist 0xC002; nothing escapes into pynetdicom.
Handlers run in pynetdicom's threads, so each query takes its own connection from the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.events import Event, EventType
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]  # pynetdicom makes its SOP classes at import
from sqlalchemy import Engine

from engine.dicom.identifier import EmptyIdentifier, UndecodableIdentifier, read_identifier
from engine.dicom.matching import MalformedQuery
from engine.dicom.query import find
from engine.dicom.scp import DicomServiceRegistry, Handler, ServiceContext, caller_aet, caller_allowed

__all__ = ["WorklistService", "register"]

log = logging.getLogger(__name__)

PENDING = 0xFF00
CANCEL = 0xFE00
SUCCESS = 0x0000
IDENTIFIER_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
UNABLE_TO_PROCESS = 0xC001
NOT_ALLOWED = 0xC002  # caller not in allowed_callers (when it got past association negotiation)

Answer = tuple[int, Dataset | None]


class WorklistService:
    """Serves the worklist table; with `station_from_caller`, a query without a station AE gets the caller's."""

    name = "mwl"
    sop_classes = (ModalityWorklistInformationFind,)

    def __init__(self, db: Engine, *, station_from_caller: bool = False) -> None:
        self.db = db
        self.station_from_caller = station_from_caller

    def handlers(self) -> list[tuple[EventType, Handler]]:
        return [(evt.EVT_C_FIND, self.on_find)]

    def on_find(self, event: Event) -> Iterator[Answer]:
        caller = "?"
        try:
            caller = caller_aet(event)
            yield from self._answer(event, caller)
        except Exception as exc:  # the type only: database errors can quote query values (PHI)
            log.error("C-FIND from %s failed: %s", caller, type(exc).__name__)
            yield UNABLE_TO_PROCESS, None

    def _answer(self, event: Event, caller: str) -> Iterator[Answer]:
        if not caller_allowed(event):
            yield NOT_ALLOWED, None
            return
        try:
            identifier = read_identifier(event)
        except UndecodableIdentifier as exc:
            log.warning("C-FIND from %s: identifier cannot be decoded (%s)", caller, exc)
            yield CANNOT_UNDERSTAND, None
            return
        except EmptyIdentifier:
            log.warning("C-FIND from %s: empty identifier", caller)
            yield IDENTIFIER_DOES_NOT_MATCH, None
            return
        count = 0
        try:
            for answer in find(self.db, identifier, caller_aet=caller, station_from_caller=self.station_from_caller):
                if event.is_cancelled:
                    log.info("C-FIND from %s cancelled after %d answers", caller, count)
                    yield CANCEL, None
                    return
                count += 1
                yield PENDING, answer
        except MalformedQuery as exc:
            log.warning("C-FIND from %s: invalid identifier (%s)", caller, exc)
            yield IDENTIFIER_DOES_NOT_MATCH, None
            return
        log.info("C-FIND from %s: %d answers", caller, count)
        yield SUCCESS, None


def register(registry: DicomServiceRegistry) -> None:
    def factory(context: ServiceContext) -> WorklistService:
        if context.db is None:
            raise ValueError("the worklist service needs the store")
        return WorklistService(context.db, station_from_caller=bool(context.settings.get("station_from_caller")))

    registry.add(WorklistService.name, factory)
