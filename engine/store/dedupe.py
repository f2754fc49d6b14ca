"""Dedupe keys: the latest stored message for each channel + sender + control id, one row each.

The primary key makes the database the judge of a simultaneous resend: two engine processes
that store the same MSH-10 at the same moment both try to *claim* its key, and only one claim
can take it. A claim replaces the row only when the claimer saw it (`expected`, the message id
it found), when it lies outside the dedupe window, or when it names a message that was refused
(a refused message is processed again when resent). PostgreSQL makes the second claimer wait for
the first one's commit, so the loser reads the winner's stored answer. Statements go straight to
the driver: they are on the writer's hot path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Column, String, text
from sqlalchemy.engine import Connection, Dialect
from sqlmodel import Field, SQLModel

from engine.store.fastsql import marker, raw_select

__all__ = ["DedupeKey", "KeyedMessage", "Keys", "backfill", "epoch", "purge_expired"]


class DedupeKey(SQLModel, table=True):
    __tablename__ = "dedupe_keys"
    # one b-tree on SQLite (no rowid): the key is the row
    __table_args__ = {"sqlite_with_rowid": False}

    channel: str = Field(sa_column=Column(String(100), primary_key=True))
    control_id: str = Field(sa_column=Column(String(200), primary_key=True))
    sender: str = Field(sa_column=Column(String(400), primary_key=True))
    message_id: int
    body_hash: str = Field(default="", max_length=64)
    status: str = Field(default="", max_length=20)
    # when the message was received, in seconds since the epoch (cheap to write on the hot path)
    received: int = Field(sa_column=Column(BigInteger, nullable=False))


KEYS = DedupeKey.__table__  # type: ignore[attr-defined]  # SQLModel adds __table__ to table classes


@dataclass
class KeyedMessage:
    """The message a key names, with the answer it was given."""

    message_id: int
    body_hash: str
    status: str
    answer: str
    received: int  # seconds since the epoch


class Keys:
    """The dedupe-key statements for one dialect."""

    def __init__(self, dialect: Dialect) -> None:
        m = marker(dialect)
        self._mark = m
        self._many: dict[int, str] = {}  # claim_new's statement by row count
        self._claim = (
            "INSERT INTO dedupe_keys (channel, control_id, sender, message_id, body_hash, status, received)"
            f" VALUES ({m}, {m}, {m}, {m}, {m}, {m}, {m})"
            " ON CONFLICT (channel, control_id, sender) DO UPDATE SET message_id = excluded.message_id,"
            " body_hash = excluded.body_hash, status = excluded.status, received = excluded.received"
            f" WHERE dedupe_keys.message_id = {m} OR dedupe_keys.received < {m}"
            " OR dedupe_keys.status = 'error'"
            " RETURNING message_id"
        )
        self._one = (
            "SELECT k.message_id, k.body_hash, k.status, m.ack, k.received FROM dedupe_keys k"
            f" JOIN messages m ON m.id = k.message_id WHERE k.channel = {m} AND k.control_id = {m} AND k.sender = {m}"
        )

    def claim(
        self, conn: Connection, key: tuple[str, str, str], message_id: int, digest: str, status: str,
        received: int, expected: int, cutoff: int,
    ) -> bool:
        """Point the key at `message_id`; False when another message holds it (see the module doc).
        `received` and `cutoff` (the start of the dedupe window) are seconds since the epoch."""
        channel, sender, control_id = key
        params = (channel, control_id, sender, message_id, digest, status, received, expected, cutoff)
        return bool(raw_select(conn, self._claim, params))

    def claim_new(
        self, conn: Connection, claims: Sequence[tuple[tuple[str, str, str], int, str, str, int]], cutoff: int
    ) -> set[tuple[str, str, str]]:
        """Claim keys the claimers found free, in one statement: (key, message id, digest, status,
        received) each, every key once. Returns the keys taken; any other one is held by another
        message (claim it alone to learn more)."""
        m = self._mark
        sql = self._many.get(len(claims))
        if sql is None:
            values = ", ".join([f"({m}, {m}, {m}, {m}, {m}, {m}, {m})"] * len(claims))
            sql = self._many[len(claims)] = (
                "INSERT INTO dedupe_keys (channel, control_id, sender, message_id, body_hash, status, received)"
                f" VALUES {values}"
                " ON CONFLICT (channel, control_id, sender) DO UPDATE SET message_id = excluded.message_id,"
                " body_hash = excluded.body_hash, status = excluded.status, received = excluded.received"
                f" WHERE dedupe_keys.received < {m} OR dedupe_keys.status = 'error'"
                " RETURNING channel, sender, control_id"
            )
        params: list[Any] = []
        for (channel, sender, control_id), message_id, digest, status, received in claims:
            params += (channel, control_id, sender, message_id, digest, status, received)
        params.append(cutoff)
        return {(row[0], row[1], row[2]) for row in raw_select(conn, sql, params)}

    def holder(self, conn: Connection, key: tuple[str, str, str]) -> KeyedMessage | None:
        channel, sender, control_id = key
        rows = raw_select(conn, self._one, (channel, control_id, sender))
        return KeyedMessage(*rows[0]) if rows else None

    def load(
        self, conn: Connection, channel: str, control_ids: Sequence[str]
    ) -> dict[tuple[str, str, str], KeyedMessage]:
        """The keyed message of each (sender, control id) of a channel: one query for a group."""
        m = self._mark
        sql = (
            "SELECT k.sender, k.control_id, k.message_id, k.body_hash, k.status, m.ack, k.received"
            " FROM dedupe_keys k JOIN messages m ON m.id = k.message_id"
            f" WHERE k.channel = {m} AND k.control_id IN ({', '.join([m] * len(control_ids))})"
        )
        return {
            (channel, row[0], row[1]): KeyedMessage(row[2], row[3], row[4], row[5], row[6])
            for row in raw_select(conn, sql, [channel, *control_ids])
        }


def epoch(when: datetime) -> int:
    return int(when.timestamp())


def backfill(conn: Connection) -> int:
    """A store made before this table: key the latest message of every (channel, sender, control id),
    so resends of what it already holds are still recognised."""
    seconds = ("CAST(EXTRACT(EPOCH FROM m.received_at) AS BIGINT)" if conn.dialect.name == "postgresql"
               else "CAST(strftime('%s', m.received_at) AS INTEGER)")
    result = conn.execute(text(
        "INSERT INTO dedupe_keys (channel, control_id, sender, message_id, body_hash, status, received)"
        f" SELECT m.channel, m.control_id, m.sender, m.id, m.body_hash, m.status, {seconds} FROM messages m"
        " JOIN (SELECT max(id) AS id FROM messages WHERE control_id != '' AND status != 'duplicate'"
        " GROUP BY channel, control_id, sender) latest ON latest.id = m.id"
    ))
    return int(result.rowcount or 0)


def purge_expired(conn: Connection, before: datetime) -> int:
    """Keys older than the dedupe window name nothing a resend can match: delete them."""
    result = conn.execute(KEYS.delete().where(KEYS.c.received < epoch(before)))
    return int(result.rowcount or 0)
