"""The two tables every channel uses: messages as received, and deliveries to destinations."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import Column, Index, LargeBinary, Text, text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class MessageStatus(StrEnum):
    PROCESSED = "processed"  # stored, mapped, local effects committed, deliveries queued
    FILTERED = "filtered"  # stored and ACKed AA, but the channel's filter let it go no further
    ERROR = "error"  # stored as received; the sender got AE/AR with the reason
    DUPLICATE = "duplicate"  # a resend of a message already processed: answered with its ACK


class DeliveryState(StrEnum):
    PENDING = "pending"
    DOING = "doing"
    DONE = "done"
    DEAD = "dead"


class Message(SQLModel, table=True):
    __tablename__ = "messages"
    __table_args__ = (
        # every index is a page written per message: only those queries need
        # (resends are found through dedupe_keys, which holds the unique key: engine.store.dedupe)
        Index("ix_messages_channel_received", "channel", "received_at"),
        Index("ix_messages_patient", "patient_id"),
        Index("ix_messages_errors", "id", sqlite_where=text("status = 'error'"),
              postgresql_where=text("status = 'error'")),
    )

    id: int | None = Field(default=None, primary_key=True)
    channel: str = Field(max_length=100)
    sender: str = Field(default="", max_length=400)  # MSH-3|MSH-4 (or client address)
    control_id: str = Field(default="", max_length=200)
    message_type: str = Field(default="", max_length=40)
    patient_id: str = Field(default="", max_length=200)
    body_hash: str = Field(default="", max_length=64)
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    received_at: datetime = Field(default_factory=utcnow)
    processed_at: datetime | None = None
    status: str = Field(default=MessageStatus.PROCESSED, max_length=20)
    flags: str = Field(default="", max_length=200)  # e.g. "control-id-reused"
    error: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    error_code: int | None = None
    error_location: str = Field(default="", max_length=100)
    ack: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    # JSON list of ProcessingWarning.as_dict(): optional values dropped or cut ("" when none)
    warnings: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    replay_of: int | None = None


class Delivery(SQLModel, table=True):
    __tablename__ = "deliveries"
    __table_args__ = (
        Index("ix_deliveries_claim", "channel", "state", "next_attempt_at"),
        Index("ix_deliveries_order", "channel", "destination", "ordering_key", "state"),
    )

    id: int | None = Field(default=None, primary_key=True)
    message_id: int = Field(foreign_key="messages.id", index=True)
    channel: str = Field(max_length=100)
    destination: str = Field(max_length=100)
    ordering_key: str = Field(default="", max_length=200)
    state: str = Field(default=DeliveryState.PENDING, max_length=10)
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow)
    claimed_at: datetime | None = None
    # the claim: which engine node holds it, until when (renewed while it works), and how many
    # claims the delivery has had; a result is recorded only by the claim that is current
    claimed_by: str = Field(default="", max_length=200)
    lease_until: datetime | None = None
    claims: int = 0
    resent: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))  # why it went out again
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    content_type: str = Field(default="application/octet-stream", max_length=100)
    last_error: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    response: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
