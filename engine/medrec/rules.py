"""Which sources are on the list, and why the others are not.

A source is included when it is active now or was active within the window: `window_days`
calendar days in the configured zone, both ends included (day -100 in, day -101 out). Per type:

- MedicationRequest: `active` / `on-hold` whatever its date; otherwise `authoredOn` in the window
  (a request stopped 10 days ago stays on, with its status).
- MedicationDispense: `whenHandedOver` in the window (`whenPrepared` only as a configured fallback).
- MedicationAdministration: `effectiveDateTime` in, or `effectivePeriod` overlapping, the window.
- MedicationStatement: `active` / `intended`; otherwise `effectivePeriod` overlapping the window
  (an open period begun years ago counts) or `effectiveDateTime` in it (`dateAsserted` only as a
  configured fallback).
- Never: entered-in-error, cancelled, draft, declined, not-taken, not-done; `taken = n`.

With an `as_of` day the window ends that day and a source dated after it was not yet there.
Every verdict carries its reason, so `--explain` can say why a resource is not on the list.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import NamedTuple

from engine.medrec.dates import parse_fhir_date, zone
from engine.medrec.sources import MedSource

__all__ = [
    "DEFAULT_HIERARCHY",
    "DEFAULT_SYSTEMS",
    "FALLBACKS",
    "NEVER_INCLUDED",
    "NDC",
    "RXNORM",
    "SNOMED",
    "Rules",
    "Verdict",
    "assess",
]

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
NDC = "http://hl7.org/fhir/sid/ndc"
SNOMED = "http://snomed.info/sct"
DEFAULT_SYSTEMS = (RXNORM, NDC, SNOMED)
DEFAULT_HIERARCHY = ("MedicationDispense", "MedicationAdministration", "MedicationRequest", "MedicationStatement")
NEVER_INCLUDED = frozenset({"entered-in-error", "cancelled", "draft", "declined", "not-taken", "not-done"})
ACTIVE_ANY_DATE = {
    "MedicationRequest": frozenset({"active", "on-hold"}),
    "MedicationStatement": frozenset({"active", "intended"}),
}
# a fallback date element per type, used only when configured
FALLBACKS = {"whenPrepared": "MedicationDispense", "dateAsserted": "MedicationStatement"}


@dataclass(frozen=True)
class Rules:
    window_days: int = 100
    timezone: str = "UTC"
    hierarchy: tuple[str, ...] = DEFAULT_HIERARCHY
    systems: tuple[str, ...] = DEFAULT_SYSTEMS  # same medication: first system both sources have
    groups: Mapping[str, str] = field(default_factory=dict)  # RxNorm code -> group code (SBD -> SCD)
    text_merge: bool = False
    fallbacks: frozenset[str] = frozenset()  # "whenPrepared", "dateAsserted"

    @property
    def tz(self) -> tzinfo:
        return zone(self.timezone)

    def today(self, now: datetime | None = None) -> date:
        return (now or datetime.now(self.tz)).astimezone(self.tz).date()

    def rank(self, resource_type: str) -> int:
        """Higher wins a tie on the day; a type missing from the hierarchy ranks last."""
        h = self.hierarchy
        return len(h) - h.index(resource_type) if resource_type in h else 0


class Verdict(NamedTuple):  # one per source and list: a tuple is made several times faster than a frozen dataclass
    included: bool
    reason: str  # why (also for included ones: "active", "authoredOn in window" ...)
    day: date | None  # the source's relevant date (its most recent one), None when undated


def assess(source: MedSource, rules: Rules, today: date, *, as_of: bool = False) -> Verdict:
    """The verdict on one source for the list of `today` (the as-of day when `as_of`)."""
    tz = rules.tz
    start = today - timedelta(days=rules.window_days)
    days = {k: parse_fhir_date(v, tz).day for k, v in source.dates.items()}
    status, rtype = source.status, source.resource_type
    if status in NEVER_INCLUDED:
        return Verdict(False, f"status {status} is never included", _relevant(rtype, days, rules, today))
    if rtype == "MedicationStatement" and source.taken == "n":
        return Verdict(False, "taken = n", _relevant(rtype, days, rules, today))
    first = min(days.values()) if days else None
    if as_of and first is not None and first > today:
        return Verdict(False, f"dated after {today.isoformat()}", first)
    day = _relevant(rtype, days, rules, today)
    if status in ACTIVE_ANY_DATE.get(rtype, ()):
        return Verdict(True, f"status {status} (included whatever its date)", day)
    window = _window(rules.window_days, start)
    if rtype == "MedicationRequest":
        return _point(days.get("authoredOn"), "authoredOn", start, today, window)
    if rtype == "MedicationDispense":
        if "whenHandedOver" in days or "whenPrepared" not in rules.fallbacks:
            return _point(days.get("whenHandedOver"), "whenHandedOver", start, today, window)
        return _point(days.get("whenPrepared"), "whenPrepared (fallback)", start, today, window)
    if "effectiveDateTime" in days:
        return _point(days["effectiveDateTime"], "effectiveDateTime", start, today, window)
    if "effectivePeriod.start" in days or "effectivePeriod.end" in days:
        p_start, p_end = days.get("effectivePeriod.start"), days.get("effectivePeriod.end")
        if p_end is not None and p_end < start:
            return Verdict(False, f"effectivePeriod ended {p_end.isoformat()}, before the {window}", day)
        if p_start is not None and p_start > today:
            return Verdict(False, f"effectivePeriod begins after {today.isoformat()}", day)
        shape = "open effectivePeriod" if p_end is None else "effectivePeriod"
        return Verdict(True, f"{shape} overlaps the window", day)
    if rtype == "MedicationStatement" and "dateAsserted" in rules.fallbacks and "dateAsserted" in days:
        return _point(days["dateAsserted"], "dateAsserted (fallback)", start, today, window)
    return Verdict(False, "no effective[x] to place it in the window", day)


@lru_cache(maxsize=256)
def _window(days: int, start: date) -> str:
    return f"{days}-day window from {start.isoformat()}"


def _point(day: date | None, element: str, start: date, today: date, window: str) -> Verdict:
    if day is None:
        return Verdict(False, f"no {element.split(' ')[0]}", None)
    if day < start:
        return Verdict(False, f"{element} {day.isoformat()} is before the {window}", day)
    return Verdict(True, f"{element} in the window", day)


def _relevant(rtype: str, days: Mapping[str, date], rules: Rules, today: date) -> date | None:
    """A source's most recent relevant date: a period's end (capped at today) or start, the
    type's own date, or the configured fallback when the own date is missing."""
    if rtype == "MedicationRequest":
        return days.get("authoredOn")
    if rtype == "MedicationDispense":
        own = days.get("whenHandedOver")
        return own if own is not None or "whenPrepared" not in rules.fallbacks else days.get("whenPrepared")
    if "effectiveDateTime" in days:
        return days["effectiveDateTime"]
    if "effectivePeriod.end" in days:
        return min(days["effectivePeriod.end"], today)
    if "effectivePeriod.start" in days:
        return days["effectivePeriod.start"]
    if rtype == "MedicationStatement" and "dateAsserted" in rules.fallbacks:
        return days.get("dateAsserted")
    return None
