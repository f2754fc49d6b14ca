"""`engine keys status / rotate`: which key seals how many stored values, and re-sealing them.

Rotation works in small transactions (one per `batch` rows) beside a running engine: each row is
opened with whichever configured key sealed it and sealed again with the current key. A row is
written back only if it still holds the value that was read (compare and set), so a worklist item
the engine rewrote meanwhile is never overwritten with an older dataset; the engine itself seals
what it writes with its own current key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Table, and_, case, func, literal, not_, or_, select, update

from engine.store import crypto, medrec
from engine.store.models import Delivery, Message
from engine.store.steps import DATASET as STEPS_DATASET
from engine.store.steps import PerformedStep
from engine.store.worklist import WorklistItem


@dataclass(frozen=True)
class SealedColumn:
    table: Table
    column: str
    aad: bytes
    text: bool

    @property
    def name(self) -> str:
        return f"{self.table.name}.{self.column}"


COLUMNS = (
    SealedColumn(Message.__table__, "raw", crypto.RAW, False),  # type: ignore[attr-defined]  # SQLModel table
    SealedColumn(Delivery.__table__, "payload", crypto.PAYLOAD, False),  # type: ignore[attr-defined]  # (same)
    SealedColumn(WorklistItem.__table__, "dataset_json", crypto.DATASET, True),  # type: ignore[attr-defined]  # SQLModel adds __table__ to table classes
    SealedColumn(medrec.MedrecSource.__table__, "data", medrec.SOURCE_DATA, True),  # type: ignore[attr-defined]  # (same)
    SealedColumn(medrec.MedrecSourceVersion.__table__, "data", medrec.VERSION_DATA, True),  # type: ignore[attr-defined]  # (same)
    SealedColumn(medrec.MedrecRecord.__table__, "data", medrec.RECORD_DATA, True),  # type: ignore[attr-defined]  # (same)
    SealedColumn(PerformedStep.__table__, "dataset_json", STEPS_DATASET, True),  # type: ignore[attr-defined]  # (same)
)


def _key_expr(col: SealedColumn) -> Any:
    """SQL for a value's key id: bytes (binary) / hex text (text), NULL when stored clear."""
    c = col.table.c[col.column]
    if col.text:
        prefix = crypto.TEXT_PREFIX
        return case(
            (and_(func.substr(c, 1, len(prefix)) == prefix,
                  func.substr(c, len(prefix) + 1, 8) != crypto.CLEAR_ID.hex()), func.substr(c, len(prefix) + 1, 8)),
            else_=None,
        )
    return case(
        (and_(func.substr(c, 1, 4) == literal(crypto.MAGIC), func.substr(c, 5, 4) != literal(crypto.CLEAR_ID)),
         func.substr(c, 5, 4)),
        else_=None,
    )


def key_counts(engine: Engine) -> dict[str, dict[str, int]]:
    """For each sealed column: key id (hex) or "clear" -> number of rows."""
    out: dict[str, dict[str, int]] = {}
    with engine.connect() as conn:
        for col in COLUMNS:
            kid = _key_expr(col).label("kid")
            counts: dict[str, int] = {}
            for value, n in conn.execute(select(kid, func.count()).group_by(kid)):
                name = "clear" if value is None else (value if isinstance(value, str) else bytes(value).hex())
                counts[name] = counts.get(name, 0) + int(n)
            out[col.name] = counts
    return out


def _not_current(col: SealedColumn, ring: crypto.Keyring) -> Any:
    """Rows that are not sealed with the current key (clear ones included)."""
    c = col.table.c[col.column]
    assert ring.current is not None
    if col.text:
        head = f"{crypto.TEXT_PREFIX}{ring.current.id.hex()}:"
        return or_(func.substr(c, 1, len(head)) != head, func.length(c) < len(head))
    head_bytes = crypto.MAGIC + ring.current.id
    return not_(func.substr(c, 1, len(head_bytes)) == literal(head_bytes))


def rotate(
    engine: Engine,
    ring: crypto.Keyring,
    *,
    batch: int = 200,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Re-seal every value not under the current key (clear values are sealed too); per column,
    the number of rows rewritten. UnreadableValue when a row needs a key the keyring lacks."""
    if ring.current is None:
        raise crypto.KeyConfigError(f"{crypto.KEY_ENV} (or {crypto.KEYRING_ENV}) is not set: there is no key to "
                                    "rotate to")
    done: dict[str, int] = {}
    for col in COLUMNS:
        t = col.table
        c = t.c[col.column]
        last = 0
        rewritten = 0
        while True:
            with engine.begin() as conn:
                rows = conn.execute(
                    select(t.c.id, c).where(t.c.id > last, _not_current(col, ring)).order_by(t.c.id).limit(batch)
                ).all()
                for row_id, value in rows:
                    last = row_id
                    new: str | bytes
                    if col.text:
                        new = ring.seal_text(ring.open_text(value, col.aad), col.aad)
                    else:
                        new = ring.seal(ring.open(bytes(value), col.aad), col.aad)
                    result = conn.execute(update(t).where(t.c.id == row_id, c == value).values({col.column: new}))
                    rewritten += int(result.rowcount or 0)
            if progress is not None and rows:
                progress(col.name, rewritten)
            if len(rows) < batch:
                break
        done[col.name] = rewritten
    return done
