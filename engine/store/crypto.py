"""PHI at rest: AES-GCM for the stored message bodies, worklist datasets and queued payloads.

Only the three columns that carry a whole message or dataset are sealed: `messages.raw`,
`deliveries.payload` and `worklist_items.dataset_json`. The columns the engine searches on (channel,
control id, sender, message type, patient id, accession number, order numbers, SPS dates, station,
modality, status, body hash) stay clear text so that dedupe, `engine messages` filters and C-FIND
narrowing keep using their indexes.

A sealed binary value is `MAGIC | key id (4 bytes) | nonce (12) | ciphertext + tag (16)`; a sealed
text value is `ek1:<key id hex>:<base64 of nonce + ciphertext + tag>`. The key id is the start of
SHA-256 of the key, so no key needs a name and a wrong key is recognised before any decryption.
The column name is the associated data: a value copied into another column does not open.

Keys come from the environment (read once, on first use, or given to `configure`):

- `ENGINE_KEY`: base64 of 32 random bytes, the key new values are sealed with (`engine keys new`).
- `ENGINE_KEY_OLD`: further keys (comma or space separated) accepted for reading only.
- `ENGINE_KEYRING`: instead of the two above, a file holding one key per line (`#` comments);
  the first line is the current key. The engine re-reads it when it changes (checked at most once
  a second) and when a value names a key id it does not know, so a key can be rotated without a
  restart: put the new key on the first line, keep the old one below, run `engine keys rotate`,
  and remove the old line once `engine keys status` counts no value under it.

Without a key values are stored as received (a value that happens to begin with the magic is
wrapped in a clear header so that it can never be mistaken for a sealed one).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `cryptography` (OpenSSL) is loaded only once a key is configured
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from sqlalchemy import Engine

log = logging.getLogger(__name__)

MAGIC = b"\x00EK1"
CLEAR_ID = b"\x00\x00\x00\x00"  # a clear value wrapped only because it began with MAGIC
TEXT_PREFIX = "ek1:"
NONCE_SIZE = 12
KEY_SIZE = 32
HEADER_SIZE = len(MAGIC) + 4 + NONCE_SIZE

# associated data: which column a sealed value belongs to
RAW = b"messages.raw"
PAYLOAD = b"deliveries.payload"
DATASET = b"worklist_items.dataset_json"

KEY_ENV = "ENGINE_KEY"
OLD_KEYS_ENV = "ENGINE_KEY_OLD"
KEYRING_ENV = "ENGINE_KEYRING"


class KeyConfigError(ValueError):
    """A key setting that cannot be used: the message names the setting, never the key."""


class UnreadableValue(Exception):
    """A stored value that no configured key opens (its key id is said, never its content)."""


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:4]


def new_key() -> str:
    """A fresh key as ENGINE_KEY wants it."""
    return base64.b64encode(os.urandom(KEY_SIZE)).decode("ascii")


def parse_key(text: str, setting: str) -> bytes:
    """base64 of exactly 32 bytes, else a KeyConfigError naming `setting` (not the value)."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyConfigError(f"{setting} is not valid base64: it must be the base64 text of 32 random bytes "
                             "(make one with `engine keys new`)") from None
    if len(key) != KEY_SIZE:
        raise KeyConfigError(f"{setting} decodes to {len(key)} bytes, not {KEY_SIZE}: it must be the base64 text "
                             "of 32 random bytes (make one with `engine keys new`)")
    return key


@dataclass(frozen=True)
class _Key:
    id: bytes
    aead: AESGCM


class Keyring:
    """The current key (None: values are stored clear) and every key accepted for reading."""

    def __init__(self, current: bytes | None = None, others: Iterable[bytes] = (), *, source: Path | None = None):
        self._lock = threading.Lock()
        self.source = source
        self._checked = 0.0
        self._mtime: float | None = None
        self._set(current, list(others))

    def _set(self, current: bytes | None, others: list[bytes]) -> None:
        if current or others:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        keys = {key_id(k): _Key(key_id(k), AESGCM(k)) for k in ([current] if current else []) + others}
        self.current: _Key | None = keys[key_id(current)] if current else None
        self.keys = keys

    @classmethod
    def from_file(cls, path: Path) -> Keyring:
        ring = cls(source=path)
        ring._load_file()
        return ring

    @classmethod
    def from_settings(cls, key: str = "", old: str = "", keyring_file: str = "") -> Keyring:
        """From the three settings' texts (empty: unset); what `key_from_env` reads."""
        if keyring_file and (key or old):
            raise KeyConfigError(f"set {KEYRING_ENV} or {KEY_ENV}/{OLD_KEYS_ENV}, not both")
        if keyring_file:
            return cls.from_file(Path(keyring_file))
        current = parse_key(key, KEY_ENV) if key.strip() else None
        others = [parse_key(part, f"{OLD_KEYS_ENV} (key {n})")
                  for n, part in enumerate(re.split(r"[\s,]+", old.strip()), start=1) if part]
        if others and current is None:
            raise KeyConfigError(f"{OLD_KEYS_ENV} is set but {KEY_ENV} is not: old keys are for reading while "
                                 f"{KEY_ENV} seals new values")
        return cls(current, others)

    # -- the keyring file --------------------------------------------------------------------------
    def _load_file(self) -> None:
        assert self.source is not None
        setting = f"{KEYRING_ENV} ({self.source})"
        try:
            info = self.source.stat()
            text = self.source.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyConfigError(f"{setting} cannot be read ({type(exc).__name__})") from None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyConfigError(f"{setting} is readable by other users: chmod 600 it")
        lines = [ln.strip() for ln in text.splitlines()]
        keys = [parse_key(ln, f"{setting} line {n}") for n, ln in enumerate(lines, start=1)
                if ln and not ln.startswith("#")]
        if not keys:
            raise KeyConfigError(f"{setting} holds no key")
        with self._lock:
            self._set(keys[0], keys[1:])
            self._mtime = info.st_mtime
            self._checked = time.monotonic()

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the keyring file when it changed (at most once a second unless forced)."""
        if self.source is None:
            return
        now = time.monotonic()
        if not force and now - self._checked < 1.0:
            return
        self._checked = now
        try:
            mtime = self.source.stat().st_mtime
        except OSError:
            log.error("keyring file %s cannot be read; the keys already loaded stay in use", self.source)
            return
        if mtime != self._mtime:
            try:
                self._load_file()
            except KeyConfigError as exc:
                log.error("keyring not reloaded: %s; the keys already loaded stay in use", exc)
                return
            log.warning("keyring reloaded from %s: current key id %s, %d key(s) in all",
                        self.source, self.current_id(), len(self.keys))

    # -- sealing -----------------------------------------------------------------------------------
    @property
    def encrypting(self) -> bool:
        if self.source is not None:
            self.refresh()
        return self.current is not None

    def current_id(self) -> str:
        return self.current.id.hex() if self.current is not None else ""

    def seal(self, data: bytes, column: bytes) -> bytes:
        if self.source is not None:
            self.refresh()
        key = self.current
        if key is None:
            return MAGIC + CLEAR_ID + data if data[:4] == MAGIC else data
        nonce = os.urandom(NONCE_SIZE)
        return MAGIC + key.id + nonce + key.aead.encrypt(nonce, data, column)

    def open(self, value: bytes, column: bytes) -> bytes:
        if value[:4] != MAGIC:
            return value
        kid = value[4:8]
        if kid == CLEAR_ID:
            return value[8:]
        key = self._key(kid)
        try:
            return key.aead.decrypt(value[8:HEADER_SIZE], value[HEADER_SIZE:], column)
        except _invalid_tag():
            raise UnreadableValue(f"a value in {column.decode()} does not open with key id {kid.hex()} "
                                  "(damaged, or moved from another column)") from None

    def seal_text(self, text: str, column: bytes) -> str:
        if self.source is not None:
            self.refresh()
        key = self.current
        if key is None:
            if not text.startswith(TEXT_PREFIX):
                return text
            return f"{TEXT_PREFIX}{CLEAR_ID.hex()}:{base64.b64encode(text.encode('utf-8', 'surrogatepass')).decode()}"
        nonce = os.urandom(NONCE_SIZE)
        sealed = nonce + key.aead.encrypt(nonce, text.encode("utf-8", "surrogatepass"), column)
        return f"{TEXT_PREFIX}{key.id.hex()}:{base64.b64encode(sealed).decode('ascii')}"

    def open_text(self, text: str, column: bytes) -> str:
        if not text.startswith(TEXT_PREFIX):
            return text
        kid_hex, _, body = text[len(TEXT_PREFIX):].partition(":")
        try:
            kid = bytes.fromhex(kid_hex)
            sealed = base64.b64decode(body, validate=True)
        except ValueError:
            raise UnreadableValue(f"a value in {column.decode()} has a damaged header") from None
        if kid == CLEAR_ID:
            return sealed.decode("utf-8", "surrogatepass")
        key = self._key(kid)
        try:
            plain = key.aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], column)
        except _invalid_tag():
            raise UnreadableValue(f"a value in {column.decode()} does not open with key id {kid.hex()} "
                                  "(damaged, or moved from another column)") from None
        return plain.decode("utf-8", "surrogatepass")

    def _key(self, kid: bytes) -> _Key:
        key = self.keys.get(kid)
        if key is None and self.source is not None:
            self.refresh(force=True)  # the file may have gained the key since it was read
            key = self.keys.get(kid)
        if key is None:
            raise UnreadableValue(f"a stored value is sealed with key id {kid.hex()}, which no configured key "
                                  f"has (configured: {', '.join(k.hex() for k in self.keys) or 'none'}); "
                                  f"set {KEY_ENV}/{OLD_KEYS_ENV} or {KEYRING_ENV}")
        return key


def _invalid_tag() -> type[Exception]:
    from cryptography.exceptions import InvalidTag

    return InvalidTag


def stored_key_id(value: bytes | str) -> str:
    """Which key a stored value is sealed with: a key id in hex, or "clear"."""
    if isinstance(value, str):
        if value.startswith(TEXT_PREFIX):
            kid = value[len(TEXT_PREFIX):].partition(":")[0]
            return "clear" if kid == CLEAR_ID.hex() else kid
        return "clear"
    if value[:4] == MAGIC and value[4:8] != CLEAR_ID:
        return value[4:8].hex()
    return "clear"


# -- the process's keyring ---------------------------------------------------------------------------
_active: Keyring | None = None
_active_lock = threading.Lock()


def key_from_env() -> Keyring:
    """The keyring ENGINE_KEY / ENGINE_KEY_OLD / ENGINE_KEYRING describe (KeyConfigError if unusable)."""
    env = os.environ
    return Keyring.from_settings(env.get(KEY_ENV, ""), env.get(OLD_KEYS_ENV, ""), env.get(KEYRING_ENV, ""))


def configure(ring: Keyring | None) -> None:
    """Use this keyring from now on (None: read the environment again on next use)."""
    global _active
    with _active_lock:
        _active = ring


def keyring() -> Keyring:
    """The process's keyring, read from the environment on first use."""
    global _active
    ring = _active
    if ring is None:
        with _active_lock:
            ring = _active
            if ring is None:
                ring = _active = key_from_env()
    return ring


def announce() -> None:
    """Say at start whether PHI is sealed at rest (the key id only, never the key)."""
    ring = keyring()
    if ring.encrypting:
        log.info("stored message bodies, worklist datasets and queued payloads are encrypted (AES-GCM, key id %s, "
                 "%d key(s) accepted for reading)", ring.current_id(), len(ring.keys))
    else:
        log.warning("%s is not set: message bodies, worklist datasets and queued payloads (PHI) are stored "
                    "unencrypted", KEY_ENV)


def seal(data: bytes, column: bytes) -> bytes:
    return keyring().seal(data, column)


def open_value(value: bytes, column: bytes) -> bytes:
    return keyring().open(value, column)


def seal_text(text: str, column: bytes) -> str:
    return keyring().seal_text(text, column)


def open_text(text: str, column: bytes) -> str:
    return keyring().open_text(text, column)


def check_store(engine: Engine) -> None:
    """Refuse to start on a key that cannot read the store: the newest value of each sealed column
    must name a configured key id (a wrong ENGINE_KEY is caught here, not at the first C-FIND)."""
    from sqlalchemy import func, select

    from engine.store.models import Delivery, Message
    from engine.store.worklist import WorklistItem

    ring = keyring()
    with engine.connect() as conn:
        for table, column in ((Message.__table__, "raw"), (Delivery.__table__, "payload"),  # type: ignore[attr-defined]  # SQLModel adds __table__ to table classes
                              (WorklistItem.__table__, "dataset_json")):  # type: ignore[attr-defined]  # SQLModel adds __table__ to table classes
            head = conn.execute(
                select(func.substr(table.c[column], 1, 64)).order_by(table.c.id.desc()).limit(1)
            ).scalar()
            if head is None:
                continue
            kid = stored_key_id(head)
            if kid == "clear" or bytes.fromhex(kid) in ring.keys:
                continue
            ring.refresh(force=True)
            if bytes.fromhex(kid) in ring.keys:
                continue
            configured = ", ".join(k.hex() for k in ring.keys) or "none"
            raise KeyConfigError(
                f"the store's newest {table.name}.{column} value is sealed with key id {kid}, which no configured "
                f"key has (configured: {configured}): {KEY_ENV} (or {OLD_KEYS_ENV}, {KEYRING_ENV}) must hold the key "
                "this store was written with"
            )
