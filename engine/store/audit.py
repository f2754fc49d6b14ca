"""Who asked the HTTP listener what, and what they got: one row per request, never the body.

Rows are written by a small background thread in batches (one transaction per half second or per
few hundred requests), so auditing costs the hot path a queue put, not a commit. Rows still
waiting when the engine stops are written by `stop()`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Index, insert
from sqlmodel import Field, SQLModel

from engine.store.models import utcnow

log = logging.getLogger(__name__)

__all__ = ["AuditRow", "AuditWriter", "HttpAudit"]


class HttpAudit(SQLModel, table=True):
    __tablename__ = "http_audit"
    __table_args__ = (Index("ix_http_audit_at", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow)
    client: str = Field(default="", max_length=100)  # address:port of the peer
    identity: str = Field(default="anonymous", max_length=100)  # "token:<digest>" or "anonymous"
    method: str = Field(default="", max_length=10)
    path: str = Field(default="", max_length=400)  # without the query string (it may name a patient)
    channel: str = Field(default="", max_length=100)
    status: int = 0
    message_id: int | None = None  # the stored message (the first one for a batch)


AUDIT = HttpAudit.__table__  # type: ignore[attr-defined]  # SQLModel adds __table__ at class creation


@dataclass
class AuditRow:
    at: datetime
    client: str
    identity: str
    method: str
    path: str
    channel: str
    status: int
    message_id: int | None = None

    def values(self) -> dict[str, Any]:
        return {"at": self.at, "client": self.client[:100], "identity": self.identity[:100],
                "method": self.method[:10], "path": self.path[:400], "channel": self.channel[:100],
                "status": self.status, "message_id": self.message_id}


class AuditWriter:
    """`add(row)` from anywhere; a daemon thread writes them in batches."""

    def __init__(self, engine: Engine, *, interval: float = 0.5, max_batch: int = 500) -> None:
        self.engine = engine
        self.interval = interval
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[AuditRow | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.written = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="http-audit", daemon=True)
        self._thread.start()

    def add(self, row: AuditRow) -> None:
        self._queue.put(row)

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        """Wake when a row arrives, then sleep out the interval and take all that came meanwhile:
        a burst is one transaction and one wake-up of this thread, not a thread switch (and a
        turn of the GIL) per request, which cost the listener ~6% of its time on List reads."""
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            time.sleep(self.interval)
            batch = [first]
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
                if len(batch) >= self.max_batch:
                    self._write(batch)
                    batch = []
            if batch:
                self._write(batch)

    def _write(self, batch: list[AuditRow]) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(AUDIT), [r.values() for r in batch])
            self.written += len(batch)
        except Exception as exc:  # the audit must never take the listener down; say it loudly
            log.error("could not write %d HTTP audit rows (%s)", len(batch), type(exc).__name__)
