"""One record per medication from a patient's sources.

Same medication = same patient and the same code in the first configured system both sources
carry (RxNorm, then NDC, then the others configured), RxNorm codes first passed through the
group table (a brand product SBD -> its generic SCD). Only what is certainly the same is merged:
a text-only medication never merges with a coded one (two text-only ones only with
`text_merge`, on equal text), a medication known only by a reference that resolved nowhere
merges only with the same reference, and a source with no medication at all is an *unmatched*
record of its own, never merged, never dropped.

A record's date is the most recent relevant day of its sources; a tie on that day goes to the
type ranked highest by the hierarchy (default Dispense > Administration > Request > Statement),
whose status, display and dose text the record shows. Every source stays listed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from engine.medrec.rules import RXNORM, Rules, Verdict, assess
from engine.medrec.sources import MedSource

__all__ = ["Excluded", "MedRecord", "Reconciliation", "reconcile", "same_medication_keys"]


@dataclass
class MedRecord:
    key: str  # identity within the patient ("<system>|<code>", "reference:...", "unmatched:<type>/<id>")
    display: str
    codes: list[tuple[str, str]]
    status: str
    date: date | None
    winner: str  # "<type>/<id>" whose date and status the record shows
    dose: str
    sources: list[dict[str, Any]] = field(default_factory=list)  # {type, id, date, status, reason}
    unmatched: bool = False  # no code and no reference: text only, or nothing at all

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "display": self.display,
            "codes": [list(c) for c in self.codes],
            "status": self.status,
            "date": self.date.isoformat() if self.date else None,
            "winner": self.winner,
            "dose": self.dose,
            "sources": self.sources,
            "unmatched": self.unmatched,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MedRecord:
        values = dict(data)
        values["codes"] = [(str(s), str(c)) for s, c in values.get("codes") or []]
        values["date"] = date.fromisoformat(values["date"]) if values.get("date") else None
        return cls(**values)


@dataclass(frozen=True)
class Excluded:
    resource_type: str
    id: str
    status: str
    date: date | None
    reason: str
    display: str


@dataclass
class Reconciliation:
    patient: str
    day: date
    records: list[MedRecord]
    excluded: list[Excluded]


def _norm_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def same_medication_keys(source: MedSource, rules: Rules) -> dict[str, str]:
    """System -> code of the source for every configured system (RxNorm through the group table)."""
    out: dict[str, str] = {}
    for system, code in source.codes:
        if system in rules.systems and system not in out:
            out[system] = rules.groups.get(code, code) if system == RXNORM else code
    return out


class _Groups:
    """Union-find over sources; candidates found through per-(system, code) buckets."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _same(a: dict[str, str], b: dict[str, str], systems: tuple[str, ...]) -> bool:
    for system in systems:
        if system in a and system in b:
            return a[system] == b[system]
    return False


def reconcile(
    patient: str, sources: Iterable[MedSource], rules: Rules, day: date, *, as_of: bool = False
) -> Reconciliation:
    """The list of `day` (today, or the as-of day with `as_of`) from one patient's sources."""
    included: list[tuple[MedSource, Verdict]] = []
    excluded: list[Excluded] = []
    for source in sources:
        verdict = assess(source, rules, day, as_of=as_of)
        if verdict.included:
            included.append((source, verdict))
        else:
            excluded.append(Excluded(source.resource_type, source.id, source.status, verdict.day, verdict.reason,
                                     source.display))

    keys = [same_medication_keys(s, rules) for s, _ in included]
    groups = _Groups(len(included))
    buckets: dict[tuple[str, str], list[int]] = {}
    for i, (source, _) in enumerate(included):
        if keys[i]:
            for system, code in keys[i].items():
                buckets.setdefault((system, code), []).append(i)
        elif source.codes:
            continue  # coded only in systems not configured: certain of nothing, so on its own
        elif source.reference:
            buckets.setdefault(("reference", source.reference), []).append(i)
        elif source.text and rules.text_merge:
            buckets.setdefault(("text", _norm_text(source.text)), []).append(i)
    for (system, _code), members in buckets.items():
        for n, a in enumerate(members):
            for b in members[n + 1:]:
                if system in ("reference", "text") or _same(keys[a], keys[b], rules.systems):
                    groups.union(a, b)

    by_root: dict[int, list[int]] = {}
    for i in range(len(included)):
        by_root.setdefault(groups.find(i), []).append(i)
    records = [_record([included[i] for i in members], [keys[i] for i in members], rules)
               for members in by_root.values()]
    records.sort(key=lambda r: (r.date or date.min, r.display.casefold()), reverse=True)
    return Reconciliation(patient, day, records, excluded)


def _record(members: list[tuple[MedSource, Verdict]], keys: list[dict[str, str]], rules: Rules) -> MedRecord:
    ordered = sorted(
        members,
        key=lambda m: (m[1].day or date.min, rules.rank(m[0].resource_type), m[0].id),
        reverse=True,
    )
    winner, verdict = ordered[0]
    codes: list[tuple[str, str]] = []
    for source, _ in ordered:
        for c in source.codes:
            if c not in codes:
                codes.append(c)
    key = _record_key(winner, keys, rules)
    return MedRecord(
        key=key,
        display=winner.display or next((s.display for s, _ in ordered if s.display), ""),
        codes=codes,
        status=winner.status,
        date=verdict.day,
        winner=winner.key,
        dose=winner.dose or next((s.dose for s, _ in ordered if s.dose), ""),
        sources=[
            {"type": s.resource_type, "id": s.id, "date": v.day.isoformat() if v.day else None,
             "status": s.status, "reason": v.reason}
            for s, v in ordered
        ],
        unmatched=not codes and not winner.reference,
    )


def _record_key(winner: MedSource, keys: list[dict[str, str]], rules: Rules) -> str:
    for system in rules.systems:
        codes = sorted({k[system] for k in keys if system in k})
        if codes:
            return f"{system}|{codes[0]}"
    if winner.codes:
        return f"coded:{winner.key}"
    if winner.reference:
        return f"reference:{winner.reference}"
    if winner.text and rules.text_merge:
        return f"text:{_norm_text(winner.text)}"
    return f"unmatched:{winner.key}"
