"""Code tables (`map:` / `table:` in a rule): inline dicts or CSV files with columns code,value.

A code the table does not know is an error (HL7 103) unless the rule says otherwise: silently
passing an unknown priority or modality through would put wrong data on the modality.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_KEY = "_default"
ON_MISSING = ("error", "default", "keep")


@dataclass(frozen=True)
class CodeTable:
    name: str  # file name or "inline", for messages
    entries: dict[str, Any]
    default: Any = None  # the `_default` entry, None when absent

    @property
    def has_default(self) -> bool:
        return self.default is not None


class TableError(Exception):
    def __init__(self, message: str, line: int = 1) -> None:
        super().__init__(message)
        self.line = line


def inline_table(data: dict[Any, Any]) -> CodeTable:
    entries = {str(k): ("" if v is None else v) for k, v in data.items() if str(k) != DEFAULT_KEY}
    default = data.get(DEFAULT_KEY)
    return CodeTable("inline", entries, None if default is None else default)


def load_csv_table(path: Path) -> CodeTable:
    """Read a code,value CSV (header row required); raise TableError naming the bad line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise TableError(f"cannot read table {path.name}: {exc.strerror}") from exc
    rows = list(csv.reader(text.splitlines()))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["code", "value"]:
        raise TableError(f"table {path.name} must start with the header row: code,value")
    entries: dict[str, Any] = {}
    default = None
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or (len(row) == 1 and not row[0].strip()) or row[0].startswith("#"):
            continue
        if len(row) < 2:
            raise TableError(f"table {path.name} line {lineno}: expected code,value", lineno)
        code, value = row[0], row[1]
        if code == DEFAULT_KEY:
            default = value
        elif code in entries:
            raise TableError(f"table {path.name} line {lineno}: code {code!r} appears twice", lineno)
        else:
            entries[code] = value
    return CodeTable(path.name, entries, default)
