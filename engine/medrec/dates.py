"""FHIR date / dateTime values turned into calendar days of the configured time zone.

The look-back counts calendar days where the clinician is, so an instant with an offset is
converted to that zone before its day is taken (23:30-05:00 is already tomorrow in UTC). A
value without a time is a day as written; a dateTime without an offset (not valid FHIR, but
sent) is read as local time. Partial dates (YYYY, YYYY-MM) count as their first day.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["BadDate", "FhirInstant", "parse_fhir_date", "zone"]

_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.\d+)?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


class BadDate(ValueError):
    """A value that is no FHIR date or dateTime (the text names no value: it may be PHI)."""


@dataclass(frozen=True)
class FhirInstant:
    """One parsed value: the local calendar day, and the instant when a time was given."""

    day: date
    instant: datetime | None  # aware, in the configured zone; None for a date without time


@lru_cache(maxsize=64)  # asked once per source by the rules; an unknown name raises (and is not remembered)
def zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


def parse_fhir_date(text: str, tz: tzinfo) -> FhirInstant:
    """The value's day (and instant) in `tz`. Remembered per (value, zone): a patient's sources
    share their days, and each value is read on arrival (checked) and again by the rules."""
    if not isinstance(text, str):
        raise BadDate("not a FHIR date or dateTime")
    return _parse(text, tz)


@lru_cache(maxsize=8192)  # FhirInstant is frozen and its parts immutable; a BadDate is not remembered
def _parse(text: str, tz: tzinfo) -> FhirInstant:
    if (isinstance(text, str) and len(text) == 10 and text[4] == "-" and text[7] == "-" and text[:4].isdigit()
            and text[5:7].isdigit() and text[8:].isdigit()):
        try:  # the common YYYY-MM-DD, without the regular expression
            return FhirInstant(date(int(text[:4]), int(text[5:7]), int(text[8:])), None)
        except ValueError:
            pass  # 2024-02-30, or not digits: the full check below says which
    match = _DATE_RE.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise BadDate("not a FHIR date or dateTime")
    g = match.groupdict()
    try:
        year, month, day = int(g["y"]), int(g["m"] or 1), int(g["d"] or 1)
        if g["H"] is None:
            return FhirInstant(date(year, month, day), None)
        moment = datetime(year, month, day, int(g["H"]), int(g["M"]), int(g["S"] or 0))
    except ValueError as exc:  # 2024-02-30, 25:00
        raise BadDate("not a valid calendar date or time") from exc
    offset = g["tz"]
    if offset is None:
        local = moment.replace(tzinfo=tz)
    else:
        stamp = moment.isoformat() + ("+00:00" if offset == "Z" else offset)
        local = datetime.fromisoformat(stamp).astimezone(tz)
    return FhirInstant(local.date(), local)
