"""The one writer: commits received messages and their effects in groups.

The event loop parses and maps; this thread owns a database connection and, for each group of
waiting work units, runs one transaction: every unit gets a savepoint, its raw row, its local
writes and its queued deliveries. A unit whose work raises is rolled back to its savepoint and
stored alone as `error`, so one bad message never takes its neighbours down, and nothing is
lost. After the single commit (one fsync for the whole group) each unit's future is resolved;
only then may the sender get its answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from engine.errors import APPLICATION_INTERNAL_ERROR, ProcessingError, ProcessingWarning
from engine.store import crypto
from engine.store.dedupe import KeyedMessage, Keys, epoch
from engine.store.fastsql import RawInsert, Savepoint
from engine.store.models import Delivery, Message, MessageStatus, utcnow

log = logging.getLogger(__name__)

MESSAGES = Message.__table__  # type: ignore[attr-defined]  # SQLModel adds __table__ at class creation
DELIVERIES = Delivery.__table__  # type: ignore[attr-defined]  # (same)
# the text columns a sender fills, cut to the schema's lengths (a long MSH-10 must not fail the insert)
_LIMITS = {
    name: MESSAGES.c[name].type.length
    for name in ("sender", "control_id", "message_type", "patient_id", "error_location")
}
ORDERING_KEY_LIMIT: int = DELIVERIES.c.ordering_key.type.length


def column_text(value: str, limit: int | None = None) -> str:
    """A sender's value as a text column can hold it: no NUL (PostgreSQL refuses it in text),
    cut to the column's length. The raw body keeps the bytes exactly as received."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    return value[:limit] if limit is not None else value


def key_text(value: str, limit: int) -> str:
    """A value that identifies something (MSH-10, an ordering key) as a column of `limit`
    characters: when it is longer, its start and a digest of the whole, so two long ids that share
    a prefix stay apart and a resend still finds its original."""
    value = column_text(value)
    if len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{value[: limit - 33]}~{digest}"


@dataclass
class QueuedPayload:
    destination: str
    body: bytes
    ordering_key: str = ""
    content_type: str = "application/octet-stream"


@dataclass
class WorkUnit:
    """One received message and what the channel wants done with it, all or nothing."""

    channel: str
    raw: bytes
    received_at: datetime
    control_id: str = ""
    message_type: str = ""
    patient_id: str = ""
    sender: str = ""
    status: str = MessageStatus.PROCESSED
    error: ProcessingError | None = None  # already failed before reaching the store
    # (conn, message_id) -> payloads to queue; raises ProcessingError to refuse the message
    effects: Callable[[Connection, int], list[QueuedPayload]] | None = None
    # builds the answer for the sender from the outcome; its text is stored with the message
    answer: Callable[[str, ProcessingError | None], str] | None = None
    # the answer should the unit commit without error, built on the event loop beforehand so the
    # single writer thread does as little as possible per message
    success_answer: str | None = None
    body_hash: str = ""
    dedupe: bool = True
    replay_of: int | None = None
    # optional values dropped or cut on the way (stored with the message, answered as ERR W)
    warnings: list[ProcessingWarning] = field(default_factory=list)


@dataclass
class _Claim:
    """A unit's claim on its dedupe key (engine.store.dedupe), made once its row exists."""

    key: tuple[str, str, str]
    digest: str
    status: str
    received: int  # seconds since the epoch
    cutoff: int  # the start of the dedupe window (the group's: see _apply_batch)
    expected: int = 0  # the message id the unit found under the key (0: none)


# SQLSTATEs of a transaction that lost a race with another process's (deadlock, serialization):
# the group is tried again, unit by unit, instead of storing anything as an error
_CONTENTION = frozenset({"40P01", "40001"})
CONTENTION_RETRIES = 5


@dataclass
class UnitResult:
    message_id: int
    status: str
    answer: str
    error: ProcessingError | None = None
    duplicate_of: int | None = None
    flags: str = ""


@dataclass
class _Pending:
    unit: WorkUnit
    future: asyncio.Future[UnitResult] | None = None
    sink: list[UnitResult | BaseException] | None = None  # submit_sync


def body_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


class Writer:
    """Start once; `await submit(unit)` from the event loop; `stop()` drains and joins."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 512,
        dedupe_window: timedelta = timedelta(days=7),
        gather_window: float = 0.001,
    ):
        self.engine = engine
        self.max_batch = max_batch
        self.dedupe_window = dedupe_window
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None
        self.gather_window = gather_window
        dialect = engine.dialect
        self._raw_insert = RawInsert(MESSAGES, dialect)
        self._keys = Keys(dialect)
        self.batches = 0
        self.units = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def submit(self, unit: WorkUnit) -> UnitResult:
        fut: asyncio.Future[UnitResult] = asyncio.get_running_loop().create_future()
        self._queue.put(_Pending(unit, future=fut))
        return await fut

    def submit_sync(self, unit: WorkUnit) -> UnitResult:
        """For the CLI and tests: run one unit in its own transaction, in this thread."""
        sink: list[UnitResult | BaseException] = []
        self._commit([_Pending(unit, sink=sink)])
        result = sink[0]
        if isinstance(result, BaseException):
            raise result
        return result

    @staticmethod
    def _answer_all(batch: list[_Pending], results: list[UnitResult | BaseException]) -> None:
        """One wake-up of each event loop per group, not one per message."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[UnitResult], Any]]] = {}
        for pending, result in zip(batch, results, strict=True):
            if pending.sink is not None:
                pending.sink.append(result)
            elif pending.future is not None:
                by_loop.setdefault(pending.future.get_loop(), []).append((pending.future, result))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_all, pairs)
            except RuntimeError:  # that loop is closed: its senders are gone
                pass

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        """Group commit. When the last group was large, senders are answered together and come
        back together: wait a moment (at most `gather_window`) for as many as last time, so one
        fsync covers them all instead of the first one or two."""
        stopping = False
        expected = 1
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            deadline = time.monotonic() + self.gather_window if expected > 1 else 0.0
            while len(batch) < self.max_batch:
                try:
                    if len(batch) < expected and (left := deadline - time.monotonic()) > 0:
                        nxt = self._queue.get(timeout=left)
                    else:
                        nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            expected = len(batch)
            self._commit(batch)

    def _connection(self) -> Connection:
        """The writer's own connection, kept for its lifetime (no pool round trip per group)."""
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self.engine.connect()
        return self._conn

    def _commit(self, batch: list[_Pending], tries: int = 0) -> None:
        try:
            conn = self._connection()
            with conn.begin():
                results = self._apply_batch(conn, [p.unit for p in batch])
        except BaseException as exc:
            self._drop_connection()
            if len(batch) == 1 and _is_contention(exc) and tries < CONTENTION_RETRIES:
                log.info("store commit lost a race with another engine process (%s); trying again", _kind(exc))
                self._commit(batch, tries + 1)
                return
            if len(batch) > 1:
                # one unit must never take its neighbours down: each is committed on its own
                log.warning("store commit failed for a group of %d messages (%s); committing each alone",
                            len(batch), _kind(exc))
                for pending in batch:
                    self._commit([pending])
                return
            self._answer_all(batch, [self._store_alone(batch[0].unit, exc)])
            return
        self.batches += 1
        self.units += len(batch)
        self._answer_all(batch, list(results))

    def _store_alone(self, unit: WorkUnit, failure: BaseException) -> UnitResult | BaseException:
        """The unit failed even on its own: keep its raw bytes as an error, without its effects."""
        log.error("store commit failed for channel %s control id %s (%s); storing it as an error",
                  unit.channel, _control_id(unit)[:64], _kind(failure))
        err = ProcessingError(f"the store refused this message ({_kind(failure)})", APPLICATION_INTERNAL_ERROR)
        try:
            conn = self._connection()
            with conn.begin():
                return self._store_error(conn, unit, unit.body_hash or body_hash(unit.raw), err, "")
        except BaseException as exc:  # the database itself is gone: the sender gets no AA
            self._drop_connection()
            log.error("store unavailable for channel %s (%s)", unit.channel, _kind(exc))
            return exc

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
            except Exception:  # pragma: no cover - already broken
                pass
            self._conn = None

    def _apply_batch(self, conn: Connection, units: list[WorkUnit]) -> list[UnitResult]:
        """Rows that need no id before their effects are inserted together, in order."""
        priors = self._load_priors(conn, units)
        # keys older than this are outside the dedupe window (one bound per group: a key at the very
        # edge of the window may count for a few more milliseconds)
        cutoff = epoch(min(u.received_at for u in units) - self.dedupe_window)
        bulk: list[tuple[dict[str, Any], UnitResult, _Claim | None]] = []
        seen: dict[tuple[str, str, str], tuple[str, UnitResult]] = {}
        results: list[UnitResult] = []

        def flush() -> None:
            if bulk:
                ids = self._raw_insert.execute(conn, (values for values, _, _ in bulk))
                claims = []
                for (_, result, claim), mid in zip(bulk, ids, strict=True):
                    result.message_id = mid
                    if claim is not None:
                        claims.append((claim, result))
                self._settle_claims(conn, claims, cutoff)
                bulk.clear()

        for unit in units:
            digest = unit.body_hash or body_hash(unit.raw)
            flags = ""
            key = (unit.channel, _sender(unit), _control_id(unit))
            keyed = unit.dedupe and bool(unit.control_id)
            check = keyed and unit.error is None
            expected = 0
            if check:
                prior = self._prior(key, seen, priors)
                if prior is not None:
                    prior_hash, prior_id, prior_ack, prior_status = prior
                    if prior_hash == digest and prior_status != MessageStatus.ERROR:
                        if prior_id == 0:  # the original is in this group, not yet inserted
                            flush()
                            prior_hash, prior_id, prior_ack, prior_status = self._prior(key, seen, priors)  # type: ignore[misc]  # found above
                        result = UnitResult(0, MessageStatus.DUPLICATE, prior_ack, duplicate_of=prior_id)
                        bulk.append((self._values(unit, digest, MessageStatus.DUPLICATE, prior_ack, None,
                                                  f"resend-of:{prior_id}"), result, None))
                        results.append(result)
                        continue
                    if prior_id == 0:
                        flush()  # the claim below must name the message it replaces
                        prior_id = seen[key][1].message_id
                    expected = prior_id
                    if prior_hash != digest:
                        flags = "control-id-reused"
            if unit.error is not None or unit.effects is None:
                status = MessageStatus.ERROR if unit.error is not None else unit.status
                answer = _success_answer(unit) if unit.error is None else _answer(unit, status, unit.error)
                result = UnitResult(0, status, answer, error=unit.error, flags=flags)
                claim = _Claim(key, digest, status, epoch(unit.received_at), cutoff, expected) if keyed else None
                bulk.append((self._values(unit, digest, status, answer, unit.error, flags), result, claim))
            else:
                flush()  # keep ids in arrival order
                claim = _Claim(key, digest, unit.status, epoch(unit.received_at), cutoff, expected) if keyed else None
                result = self._apply_effects(conn, unit, digest, flags, claim)
            results.append(result)
            if check:
                seen[key] = (digest, result)
        flush()
        return results

    @staticmethod
    def _prior(
        key: tuple[str, str, str],
        seen: dict[tuple[str, str, str], tuple[str, UnitResult]],
        priors: dict[tuple[str, str, str], KeyedMessage],
    ) -> tuple[str, int, str, str] | None:
        if key in seen:
            digest, result = seen[key]
            if result.status == MessageStatus.DUPLICATE:  # another process's original (see _settle_claim)
                return digest, result.duplicate_of or 0, result.answer, MessageStatus.PROCESSED
            return digest, result.message_id, result.answer, result.status
        row = priors.get(key)
        return (row.body_hash, row.message_id, row.answer, row.status) if row is not None else None

    def _load_priors(self, conn: Connection, units: list[WorkUnit]) -> dict[tuple[str, str, str], KeyedMessage]:
        """The keyed message for each (channel, sender, control id) in the group: one query."""
        wanted: dict[str, set[str]] = {}
        oldest = None
        for u in units:
            if u.dedupe and u.control_id and u.error is None:
                wanted.setdefault(u.channel, set()).add(_control_id(u))
                oldest = u.received_at if oldest is None or u.received_at < oldest else oldest
        found: dict[tuple[str, str, str], KeyedMessage] = {}
        if oldest is None:
            return found
        since = epoch(oldest - self.dedupe_window)
        for channel, control_ids in wanted.items():
            for key, row in self._keys.load(conn, channel, sorted(control_ids)).items():
                if row.received >= since:
                    found[key] = row
        return found

    def _claim(self, conn: Connection, claim: _Claim, message_id: int) -> bool:
        return self._keys.claim(conn, claim.key, message_id, claim.digest, claim.status, claim.received,
                                claim.expected, claim.cutoff)

    def _settle_claims(self, conn: Connection, claims: list[tuple[_Claim, UnitResult]], cutoff: int) -> None:
        """The claims of rows inserted together: those that found their key free in one statement,
        the rest (and any that lost it meanwhile) one by one, in arrival order."""
        first: dict[tuple[str, str, str], tuple[_Claim, UnitResult]] = {}
        for claim, result in claims:
            if claim.expected == 0 and claim.key not in first:
                first[claim.key] = (claim, result)
        taken: set[tuple[str, str, str]] = set()
        if first:
            taken = self._keys.claim_new(
                conn, [(c.key, r.message_id, c.digest, c.status, c.received) for c, r in first.values()], cutoff)
        for claim, result in claims:
            if claim.key in taken and first[claim.key][0] is claim:
                continue
            self._settle_claim(conn, claim, result)

    def _settle_claim(self, conn: Connection, claim: _Claim, result: UnitResult) -> None:
        """A row inserted without effects claims its key; when another process stored the same
        message first, the row becomes that one's duplicate (its answer is the first one's)."""
        for _ in range(CONTENTION_RETRIES):
            if self._claim(conn, claim, result.message_id) or claim.status == MessageStatus.ERROR:
                return  # (a refused message leaves the key to the one that went through)
            holder = self._keys.holder(conn, claim.key)
            if holder is None:
                continue
            if holder.body_hash == claim.digest and holder.status != MessageStatus.ERROR:
                log.info("channel %s control id %s: stored meanwhile as message %s (another engine process); "
                         "answered as its duplicate", claim.key[0], claim.key[2][:64], holder.message_id)
                flags = f"resend-of:{holder.message_id}"
                conn.execute(
                    MESSAGES.update().where(MESSAGES.c.id == result.message_id)
                    .values(status=MessageStatus.DUPLICATE, ack=holder.answer, flags=flags)
                )
                result.status, result.answer, result.flags = MessageStatus.DUPLICATE, holder.answer, ""
                result.duplicate_of = holder.message_id
                return
            claim.expected = holder.message_id
            if holder.body_hash != claim.digest and not result.flags:
                result.flags = "control-id-reused"
                conn.execute(MESSAGES.update().where(MESSAGES.c.id == result.message_id).values(flags=result.flags))
        raise _Contended("dedupe key kept changing under this writer")

    def _apply_effects(
        self, conn: Connection, unit: WorkUnit, digest: str, flags: str, claim: _Claim | None
    ) -> UnitResult:
        assert unit.effects is not None
        for _ in range(CONTENTION_RETRIES):
            savepoint = Savepoint(conn)
            holder: KeyedMessage | None = None
            try:
                answer = _success_answer(unit)  # the savepoint takes it back if the effects fail
                mid = self._insert(conn, self._values(unit, digest, unit.status, answer, None, flags))
                if claim is not None and not self._claim(conn, claim, mid):
                    # another process stored a message under this key since the group began
                    holder = self._keys.holder(conn, claim.key)
                    raise _Lost
                payloads = unit.effects(conn, mid)
                if payloads:
                    self._queue_deliveries(conn, unit, mid, payloads)
                savepoint.release()
                return UnitResult(mid, unit.status, answer, flags=flags)
            except _Lost:
                savepoint.rollback()
                if holder is not None and holder.body_hash == digest and holder.status != MessageStatus.ERROR:
                    log.info("channel %s control id %s: stored meanwhile as message %s (another engine process); "
                             "answered as its duplicate", unit.channel, _control_id(unit)[:64], holder.message_id)
                    return self._store_duplicate(conn, unit, digest, holder)
                if holder is not None and claim is not None:
                    claim.expected = holder.message_id
                    flags = "control-id-reused" if holder.body_hash != digest else flags
                continue
            except ProcessingError as exc:
                savepoint.rollback()
                return self._store_error(conn, unit, digest, exc, flags, claim)
            except Exception as exc:  # a bug or a database error in one unit: keep the message
                if _is_contention(exc):
                    raise  # the whole group is tried again, unit by unit
                # the type only: a database error's text carries bound parameters (PHI)
                log.error("processing failed on channel %s control id %s (%s)", unit.channel,
                          _control_id(unit)[:64], _kind(exc), exc_info=not _is_database_error(exc))
                savepoint.rollback()
                err = ProcessingError(f"internal error: {type(exc).__name__}", APPLICATION_INTERNAL_ERROR)
                return self._store_error(conn, unit, digest, err, flags, claim)
        raise _Contended("dedupe key kept changing under this writer")

    @staticmethod
    def _queue_deliveries(conn: Connection, unit: WorkUnit, mid: int, payloads: list[QueuedPayload]) -> None:
        now = utcnow()
        conn.execute(
            insert(DELIVERIES),
            [
                {
                    "message_id": mid,
                    "channel": unit.channel,
                    "destination": p.destination,
                    "ordering_key": key_text(p.ordering_key, ORDERING_KEY_LIMIT),
                    "state": "pending",
                    "attempts": 0,
                    "next_attempt_at": now,
                    "payload": crypto.seal(p.body, crypto.PAYLOAD),
                    "content_type": p.content_type,
                    "last_error": "",
                    "response": "",
                    "created_at": now,
                    "updated_at": now,
                }
                for p in payloads
            ],
        )

    def _store_duplicate(self, conn: Connection, unit: WorkUnit, digest: str, holder: KeyedMessage) -> UnitResult:
        values = self._values(unit, digest, MessageStatus.DUPLICATE, holder.answer, None,
                              f"resend-of:{holder.message_id}")
        mid = self._insert(conn, values)
        return UnitResult(mid, MessageStatus.DUPLICATE, holder.answer, duplicate_of=holder.message_id)

    def _store_error(
        self, conn: Connection, unit: WorkUnit, digest: str, exc: ProcessingError, flags: str,
        claim: _Claim | None = None,
    ) -> UnitResult:
        answer = _answer(unit, MessageStatus.ERROR, exc)
        mid = self._insert(conn, self._values(unit, digest, MessageStatus.ERROR, answer, exc, flags))
        if claim is not None:
            claim.status = MessageStatus.ERROR
            self._claim(conn, claim, mid)
        return UnitResult(mid, MessageStatus.ERROR, answer, error=exc, flags=flags)

    def _insert(self, conn: Connection, values: dict[str, Any]) -> int:
        return self._raw_insert.execute(conn, [values])[0]

    @staticmethod
    def _values(
        unit: WorkUnit, digest: str, status: str, answer: str, exc: ProcessingError | None, flags: str
    ) -> dict[str, Any]:
        cut = _LIMITS
        return {
            "channel": unit.channel,
            "sender": _sender(unit),
            "control_id": _control_id(unit),
            "message_type": column_text(unit.message_type, cut["message_type"]),
            "patient_id": column_text(unit.patient_id, cut["patient_id"]),
            "body_hash": digest,
            "raw": crypto.seal(unit.raw, crypto.RAW),  # sealed when ENGINE_KEY is set
            "received_at": unit.received_at,
            "processed_at": utcnow(),
            "status": status,
            "flags": flags,
            "error": column_text(str(exc)) if exc else "",
            "error_code": exc.code if exc else None,
            "error_location": column_text(exc.location, cut["error_location"]) if exc else "",
            "ack": column_text(answer),
            "warnings": json.dumps([w.as_dict() for w in unit.warnings]) if unit.warnings else "",
            "replay_of": unit.replay_of,
        }


def _control_id(unit: WorkUnit) -> str:
    return key_text(unit.control_id, _LIMITS["control_id"])


def _sender(unit: WorkUnit) -> str:
    return key_text(unit.sender, _LIMITS["sender"])


def _kind(exc: BaseException) -> str:
    """An exception named without its text (a database error's text quotes the values)."""
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's error
    return f"{type(exc).__name__}/{type(orig).__name__}" if orig is not None else type(exc).__name__


def _is_database_error(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError)


class _Lost(Exception):
    """The unit's dedupe key went to another process's message: its savepoint is rolled back."""


class _Contended(Exception):
    """Another process kept winning this unit's dedupe key: the group is tried again unit by unit."""


def _is_contention(exc: BaseException) -> bool:
    if isinstance(exc, _Contended):
        return True
    # SQLAlchemy wraps the driver's error (`.orig`); a statement run on the raw driver connection
    # (engine.store.fastsql, the medication store's locks) raises psycopg's own, which has `.sqlstate`
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "sqlstate", None) in _CONTENTION


def _success_answer(unit: WorkUnit) -> str:
    if unit.success_answer is not None:
        return unit.success_answer
    return _answer(unit, unit.status, None)


def _answer(unit: WorkUnit, status: str, error: ProcessingError | None) -> str:
    return unit.answer(status, error) if unit.answer else ""


def _settle_all(pairs: list[tuple[asyncio.Future[UnitResult], UnitResult | BaseException]]) -> None:
    for fut, result in pairs:
        if fut.done():
            continue
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)
