"""Move an order's scheduled start to another day, for test sends (`engine send --today`).

Sample and test messages carry fixed dates. Once those dates have passed, the worklist purge drops
the SCHEDULED items a week later, and modalities, which usually ask for today's steps, never show
them. Only the scheduled-start fields move, and all by the same number of whole days: the earliest
one lands on the target day, times of day, offsets and the spacing between the orders of one
message stay as sent. The bytes are edited in place (no decode and re-encode), so MSH-18
charsets and escapes pass through untouched.
"""

from __future__ import annotations

import re
from datetime import date, timedelta

__all__ = ["SCHEDULED_START_FIELDS", "move_scheduled_dates"]

# segment -> (field, component) of the scheduled start date/time (TQ-5.4 / TS / DTM)
SCHEDULED_START_FIELDS: dict[bytes, tuple[tuple[int, int], ...]] = {
    b"ORC": ((7, 4),),  # ORC-7.4 quantity/timing start date/time (v2.3 - v2.4)
    b"TQ1": ((7, 1),),  # TQ1-7 start date/time (v2.5+)
    b"OBR": ((27, 4), (36, 1)),  # OBR-27.4 quantity/timing start, OBR-36 scheduled date/time
}
_DATE = re.compile(rb"^(\d{8})")
_SEGMENT_END = re.compile(rb"(\r\n|\n|\r)")


def _day(value: bytes) -> date | None:
    m = _DATE.match(value)
    if m is None:
        return None
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except ValueError:
        return None


def _edit(body: bytes, change: dict[date, date] | None, seen: list[date]) -> bytes:
    """Walk every scheduled-start value; collect its day in `seen`, or replace it by `change`."""
    if not body.startswith(b"MSH") or len(body) < 8:
        return body
    fs = body[3:4]
    enc = body[4:8]
    cs, rs = enc[0:1], enc[1:2]
    parts = _SEGMENT_END.split(body)  # keeps the terminators, so they go back as they were
    for i in range(0, len(parts), 2):
        seg = parts[i]
        spots = SCHEDULED_START_FIELDS.get(seg[:3])
        if not spots or seg[3:4] != fs:
            continue
        fields = seg.split(fs)
        for field_no, comp_no in spots:
            if field_no >= len(fields) or not fields[field_no]:
                continue
            reps = fields[field_no].split(rs)
            for r, rep in enumerate(reps):
                comps = rep.split(cs)
                if comp_no > len(comps):
                    continue
                day = _day(comps[comp_no - 1])
                if day is None:
                    continue
                if change is None:
                    seen.append(day)
                else:
                    comps[comp_no - 1] = change[day].strftime("%Y%m%d").encode() + comps[comp_no - 1][8:]
                    reps[r] = cs.join(comps)
            fields[field_no] = rs.join(reps)
        parts[i] = fs.join(fields)
    return b"".join(parts)


def move_scheduled_dates(body: bytes, target: date) -> tuple[bytes, int]:
    """`body` with its scheduled starts shifted so that the earliest falls on `target`; and how many moved."""
    seen: list[date] = []
    _edit(body, None, seen)
    if not seen:
        return body, 0
    shift = target - min(seen)
    if shift == timedelta(0):
        return body, len(seen)
    return _edit(body, {d: d + shift for d in seen}, []), len(seen)
