"""The Modality Worklist SCP: C-FIND (MWL information model) and C-ECHO over pynetdicom.

Thin on purpose: the identifier goes to `query.find`, answers are yielded with 0xFF00 and the
handler checks `event.is_cancelled` between them. An invalid identifier gets 0xA900, anything
else that raises 0xC001; nothing escapes into pynetdicom. Handlers run in pynetdicom's threads,
so each query takes its own connection from the SQLAlchemy engine.

Two pynetdicom defaults are changed: accepted sockets get TCP_NODELAY (otherwise an answer split
over PDUs waits ~40 ms on Nagle + delayed ACK), and pynetdicom's logger is held at WARNING because
it logs query identifiers (PHI) at lower levels.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification  # type: ignore[attr-defined]
from sqlalchemy import Engine

from engine.dicom.matching import MalformedQuery
from engine.dicom.query import find

__all__ = ["WorklistSCP"]

log = logging.getLogger(__name__)

PENDING = 0xFF00
CANCEL = 0xFE00
SUCCESS = 0x0000
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC001
NOT_ALLOWED = 0xC002  # caller not in allowed_callers (when it got past association negotiation)


def quiet_pynetdicom() -> None:
    """pynetdicom logs (and decodes twice to log) identifiers, which hold PHI: switch that off process-wide."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def set_nodelay(sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # pragma: no cover - closed or non-TCP socket
        pass


class WorklistSCP:
    """Serves the worklist table to modalities. `start()` returns at once; `stop()` closes the port."""

    def __init__(
        self,
        db_engine: Engine,
        ae_title: str,
        host: str,
        port: int,
        *,
        allowed_callers: list[str] | None = None,
        station_from_caller: bool = False,
    ) -> None:
        self.db_engine = db_engine
        self.ae_title = ae_title
        self.host = host
        self._port = port
        self.allowed_callers = [a.strip() for a in allowed_callers] if allowed_callers else None
        self.station_from_caller = station_from_caller
        self._ae: AE | None = None
        self._server: Any = None

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0)."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._port

    def start(self) -> None:
        quiet_pynetdicom()
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(ModalityWorklistInformationFind)
        ae.add_supported_context(Verification)
        if self.allowed_callers:
            ae.require_calling_aet = self.allowed_callers  # others get A-ASSOCIATE-RJ
        handlers = [(evt.EVT_C_FIND, self._on_find), (evt.EVT_CONN_OPEN, self._on_open)]
        self._server = ae.start_server((self.host, self._port), block=False, evt_handlers=handlers)
        self._ae = ae
        log.info("worklist SCP %s listening on %s:%d", self.ae_title, self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None

    # -- handlers (pynetdicom threads) --------------------------------------------------------------

    @staticmethod
    def _on_open(event: Any) -> None:
        set_nodelay(event.assoc.dul.socket.socket)

    def _on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        caller = str(event.assoc.requestor.ae_title).strip()
        if self.allowed_callers and caller not in self.allowed_callers:
            yield NOT_ALLOWED, None
            return
        try:
            identifier = event.identifier
        except Exception:  # undecodable dataset
            log.warning("C-FIND from %s: identifier cannot be decoded", caller)
            yield IDENTIFIER_DOES_NOT_MATCH, None
            return
        try:
            answers = find(self.db_engine, identifier, caller_aet=caller, station_from_caller=self.station_from_caller)
            count = 0
            for answer in answers:
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
        except Exception as exc:  # the type only: database errors can quote query values (PHI)
            log.error("C-FIND from %s failed: %s", caller, type(exc).__name__)
            yield UNABLE_TO_PROCESS, None
            return
        log.info("C-FIND from %s: %d answers", caller, count)
        yield SUCCESS, None
