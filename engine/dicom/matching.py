"""DICOM C-FIND matching (PS3.4 C.2.2.2, annex K) of a query identifier against worklist items.

The query is compiled once (`compile_query`) into key tests; items are the worklist contract
dicts (keywords -> DICOM-formatted strings, sequences as lists of dicts). This module is the truth
for what matches; the SQL built in `query.py` only narrows the candidates.

Rules: universal (zero length, or a lone "*"), single value, wildcards * and ? on the string VRs
(PN case-insensitive), DA/TM/DT ranges, the combined date + time range (a date range with a time
range means "from date1 time1 to date2 time2"), UID lists, sequence matching (one query item; an
item with only universal keys matches anything). A stored zero-length value fails every
non-universal key. SPS keys sent at the top level are matched against the SPS item.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from engine.store.worklist import SPS_KEYS, normalize_da, normalize_tm, pn_key

__all__ = ["MalformedQuery", "Key", "Query", "compile_query", "matches", "value_text"]

SPS_SEQ = "ScheduledProcedureStepSequence"
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
TEXT_VRS = frozenset({"LT", "ST", "UT"})  # backslash is text there, not a value separator
_DIGITS = re.compile(r"^\d+$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


class MalformedQuery(ValueError):
    """The identifier cannot be a valid MWL query (answered with 0xA900)."""


Test = Callable[[str], bool]


@dataclass
class Key:
    keyword: str
    vr: str
    value: str  # the query value as text ("" = universal)
    test: Test | None = None  # None = universal
    items: list[Key] | None = None  # SQ: the keys of the query's (first) item

    @property
    def universal(self) -> bool:
        if self.vr == "SQ":
            return not self.items or all(k.universal for k in self.items)
        return self.test is None


@dataclass
class Query:
    """A compiled identifier: top-level keys, SPS keys (sequence item + hoisted top-level keys)."""

    keys: list[Key] = field(default_factory=list)
    sps: list[Key] = field(default_factory=list)
    hoisted: set[str] = field(default_factory=set)  # SPS keywords the query put at top level
    values: dict[str, str] = field(default_factory=dict)  # keyword -> query value, top and SPS (SQL narrowing)


def value_text(value: Any) -> str:
    """An element value (or a stored JSON value) as DICOM text; multiple values joined by backslash."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \x00")
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(value_text(v) for v in value)
    return str(value).strip()


# -- value tests ---------------------------------------------------------------------------------


def _values(stored: str, vr: str) -> list[str]:
    return [stored] if vr in TEXT_VRS else stored.split("\\")


def _wildcard(pattern: str, *, fold: bool) -> re.Pattern[str]:
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
    return re.compile("".join(parts), re.DOTALL | (re.IGNORECASE if fold else 0))


def _string_test(value: str, vr: str) -> Test:
    alternatives = _values(value, vr)
    is_pn = vr == "PN"
    tests: list[Test] = []
    for alt in alternatives:
        if is_pn:
            alt = pn_key(alt)
        if "*" in alt or "?" in alt:
            rx = _wildcard(alt, fold=is_pn)
            tests.append(functools.partial(_wildcard_test, rx))
        else:
            tests.append(alt.__eq__)

    def test(stored: str) -> bool:
        if is_pn:
            key = pn_key(stored)
            # the whole name, or its alphabetic group alone (query.py narrows on that prefix)
            candidates = [key, key.split("=")[0]] if "=" in key else [key]
        else:
            candidates = [v.strip() for v in _values(stored, vr)]
        return any(t(c) for c in candidates if c for t in tests)

    return test


def _check_da(v: str) -> str:
    v = normalize_da(v)
    if len(v) != 8 or not _DIGITS.match(v):
        raise MalformedQuery("invalid DA value in query")
    return v


def _check_tm(v: str) -> str:
    v = v.strip().replace(":", "")
    if not _TM.match(v):
        raise MalformedQuery("invalid TM value in query")
    return v


def _tm_low(v: str) -> str:
    whole, _, frac = v.partition(".")
    return whole.ljust(6, "0") + "." + frac.ljust(6, "0")


def _tm_high(v: str) -> str:
    whole, _, frac = v.partition(".")
    return whole.ljust(6, "9") + "." + frac.ljust(6, "9")


def _tm_stored(v: str) -> str:
    v = normalize_tm(v)
    return _tm_low(v) if v else ""


def _split_range(value: str) -> tuple[str, str] | None:
    if "-" not in value:
        return None
    if value.count("-") != 1:
        raise MalformedQuery("invalid range in query")
    lo, hi = value.split("-")
    if not lo and not hi:
        raise MalformedQuery("empty range in query")
    return lo.strip(), hi.strip()


def _da_bounds(value: str) -> tuple[str | None, str | None]:
    rng = _split_range(value)
    if rng is None:
        d = _check_da(value)
        return d, d
    lo, hi = rng
    return (_check_da(lo) if lo else None), (_check_da(hi) if hi else None)


def _tm_bounds(value: str) -> tuple[str | None, str | None]:
    rng = _split_range(value)
    if rng is None:
        t = _check_tm(value)
        return _tm_low(t), _tm_high(t)
    lo, hi = rng
    return (_tm_low(_check_tm(lo)) if lo else None), (_tm_high(_check_tm(hi)) if hi else None)


def _da_test(value: str) -> Test:
    lo, hi = _da_bounds(value)

    def test(stored: str) -> bool:
        d = normalize_da(stored)
        return bool(d) and (lo is None or d >= lo) and (hi is None or d <= hi)

    return test


def _tm_test(value: str) -> Test:
    lo, hi = _tm_bounds(value)

    def test(stored: str) -> bool:
        t = _tm_stored(stored)
        return bool(t) and (lo is None or t >= lo) and (hi is None or t <= hi)

    return test


def _dt_test(value: str) -> Test:
    rng = _split_range(value)
    lo, hi = rng if rng is not None else (value, value)
    if any(c not in "0123456789.+-" for c in lo + hi):
        raise MalformedQuery("invalid DT value in query")

    def test(stored: str) -> bool:
        s = stored.strip()
        return bool(s) and (not lo or s.ljust(len(lo), "0") >= lo) and (not hi or s[: len(hi)] <= hi)

    return test


def _uid_test(value: str) -> Test:
    uids = {u.strip().rstrip("\x00") for u in value.split("\\") if u.strip()}

    def test(stored: str) -> bool:
        return stored.strip().rstrip("\x00") in uids

    return test


def _exact_test(value: str, vr: str) -> Test:
    alternatives = {v.strip() for v in value.split("\\")}

    def test(stored: str) -> bool:
        return any(v.strip() in alternatives for v in stored.split("\\"))

    return test


def _make_test(value: str, vr: str) -> Test | None:
    if value == "" or value == "*":
        return None
    if vr in WILDCARD_VRS:
        return _string_test(value, vr)
    if vr == "DA":
        return _da_test(value)
    if vr == "TM":
        return _tm_test(value)
    if vr == "DT":
        return _dt_test(value)
    if vr == "UI":
        return _uid_test(value)
    return _exact_test(value, vr)


# -- compiling an identifier ------------------------------------------------------------------------


def _compile_items(ds: Dataset) -> list[Key]:
    keys: list[Key] = []
    for elem in ds:
        if elem.tag.element == 0 or elem.tag == 0x00080005:  # group lengths, SpecificCharacterSet
            continue
        keyword = elem.keyword
        if not keyword:
            continue  # private / unknown keys cannot match anything we store: returned empty, not matched
        try:
            if elem.VR == "SQ":
                seq = elem.value or []
                if len(seq) > 1:
                    raise MalformedQuery("sequence key with more than one item")
                keys.append(Key(keyword, "SQ", "", items=_compile_items(seq[0]) if seq else None))
                continue
            value = value_text(elem.value)
        except MalformedQuery:
            raise
        except Exception as exc:  # pydicom defers decoding: a bad element shows up here
            raise MalformedQuery("undecodable element in query") from exc
        keys.append(Key(keyword, str(elem.VR), value, test=_make_test(value, str(elem.VR))))
    _combine_date_time(keys)
    return keys


def _combine_date_time(keys: list[Key]) -> None:
    """Date range + time range on a pair (…Date, …Time) match as one period, not independently."""
    by_kw = {k.keyword: k for k in keys}
    for dkey in list(keys):
        if dkey.vr != "DA" or not dkey.keyword.endswith("Date") or dkey.test is None:
            continue
        tkey = by_kw.get(dkey.keyword[:-4] + "Time")
        if tkey is None or tkey.vr != "TM" or tkey.test is None:
            continue
        if "-" not in dkey.value and "-" not in tkey.value:
            continue
        d1, d2 = _da_bounds(dkey.value)
        t1, t2 = _tm_bounds(tkey.value)
        lo = (d1, t1 or _tm_low("00")) if d1 else None
        hi = (d2, t2 or _tm_high("23")) if d2 else None

        def make(
            lo: Any = lo, hi: Any = hi, date_kw: str = dkey.keyword, time_kw: str = tkey.keyword
        ) -> Callable[[Mapping[str, Any]], bool]:
            def period(item: Mapping[str, Any]) -> bool:
                d = normalize_da(value_text(item.get(date_kw)))
                t = _tm_stored(value_text(item.get(time_kw)))
                if not d or not t:
                    return False
                return (lo is None or (d, t) >= lo) and (hi is None or (d, t) <= hi)

            return period

        dkey.test = _ItemTest(make())
        tkey.test = _ALWAYS  # the date key now tests both; time stays non-universal (zero length fails)


class _ItemTest:
    """A test that needs the whole item (combined date + time); marked so `_match_keys` passes it the item."""

    def __init__(self, fn: Callable[[Mapping[str, Any]], bool]) -> None:
        self.fn = fn

    def __call__(self, stored: str) -> bool:  # pragma: no cover - never called with a value
        raise TypeError("item test")


def _always(stored: str) -> bool:
    return True


_ALWAYS: Test = _always


def compile_query(identifier: Dataset) -> Query:
    """Compile a C-FIND identifier; raises MalformedQuery when it cannot be a valid query."""
    try:
        top = _compile_items(identifier)
    except MalformedQuery:
        raise
    except Exception as exc:
        raise MalformedQuery("undecodable identifier") from exc
    q = Query()
    sps_item: list[Key] = []
    for key in top:
        if key.keyword == SPS_SEQ:
            sps_item = list(key.items or [])
        elif key.keyword in SPS_KEYS:
            q.hoisted.add(key.keyword)
        else:
            q.keys.append(key)
    # a top-level SPS key counts unless the sequence item holds a real (non-universal) value for it
    hoisted = {k.keyword: k for k in top if k.keyword in q.hoisted and not k.universal}
    kept = [k for k in sps_item if not (k.keyword in hoisted and k.universal)]
    kept_kw = {k.keyword for k in kept}
    q.sps = kept + [k for kw, k in hoisted.items() if kw not in kept_kw]
    if hoisted:
        _combine_date_time(q.sps)
    for k in q.keys + q.sps:
        if k.vr != "SQ" and k.value:
            q.values.setdefault(k.keyword, k.value)
    return q


# -- matching -------------------------------------------------------------------------------------


def _match_keys(keys: Sequence[Key], item: Mapping[str, Any]) -> bool:
    for key in keys:
        if key.universal:
            continue
        if key.vr == "SQ":
            stored = item.get(key.keyword)
            if not isinstance(stored, list) or not any(
                isinstance(s, dict) and _match_keys(key.items or [], s) for s in stored
            ):
                return False
            continue
        test = key.test
        if isinstance(test, _ItemTest):
            if not test.fn(item):
                return False
            continue
        stored_text = value_text(item.get(key.keyword))
        if not stored_text or not test(stored_text):  # type: ignore[misc]  # a plain test here: _ItemTest is handled above
            return False
    return True


def matches(query: Query, item: Mapping[str, Any]) -> bool:
    """Does this worklist item (contract dict) answer the query?"""
    if not _match_keys(query.keys, item):
        return False
    if not query.sps or all(k.universal for k in query.sps):
        return True
    steps = item.get(SPS_SEQ)
    if not isinstance(steps, list):
        return False
    for step in steps:
        if not isinstance(step, dict):
            continue
        # a hoisted key the item itself holds at top level is matched there
        merged = step if not query.hoisted else {**{k: item[k] for k in query.hoisted if k in item}, **step}
        if _match_keys(query.sps, merged):
            return True
    return False


def matching_steps(query: Query, item: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The SPS items of `item` that match the query's SPS keys (all of them when universal)."""
    steps = [s for s in item.get(SPS_SEQ) or [] if isinstance(s, dict)]
    if not query.sps or all(k.universal for k in query.sps):
        return steps
    return [s for s in steps if _match_keys(query.sps, s)]


def _wildcard_test(rx: re.Pattern[str], stored: str) -> bool:
    return rx.fullmatch(stored) is not None
