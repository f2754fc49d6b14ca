"""move_scheduled_dates: whole days, earliest start on the target day, everything else byte for byte."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from engine.hl7.er7 import Message
from engine.hl7.reschedule import move_scheduled_dates

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "hl7"
MSH = b"MSH|^~\\&|RIS|RAD|ENGINE|HOSP|20261124153000||ORM^O01|X1|P|2.5.1"


def seg(name: str, **fields: str) -> bytes:
    """One segment with the given fields (f7="..." is field 7), the others empty."""
    numbered = {int(k[1:]): v for k, v in fields.items()}
    return "|".join([name] + [numbered.get(i, "") for i in range(1, max(numbered) + 1)]).encode() + b"\r"


def test_orders_on_different_days_keep_their_spacing_across_a_month_end() -> None:
    body = (MSH + b"\r" + seg("ORC", f1="NW", f2="P1", f7="^^^202611251000+0100^^R")
            + seg("OBR", f1="1", f2="P1", f18="A1", f27="^^^202611251000")
            + seg("ORC", f1="NW", f2="P2", f7="^^^202611270730^^S") + seg("OBR", f1="2", f2="P2", f36="20261127"))
    moved, n = move_scheduled_dates(body, date(2027, 1, 30))
    assert n == 4
    msg = Message.parse(moved)
    assert msg.get("ORC[1]-7.4") == "202701301000+0100"  # the offset stays
    assert msg.get("ORC[2]-7.4") == "202702010730"  # two days later, as before
    assert msg.get("OBR[1]-27.4") == "202701301000"
    assert msg.get("OBR[2]-36") == "20270201"
    assert moved.replace(b"20270130", b"20261125").replace(b"20270201", b"20261127") == body


def test_tq1_and_subcomponent_timestamps_and_repetitions() -> None:
    body = (MSH + b"\r" + seg("ORC", f1="NW", f7="^^^20261125080000&S~^^^20261126090000&S")
            + seg("TQ1", f1="1", f7="20261125080000&M", f9="R") + seg("OBR", f1="1"))
    moved, n = move_scheduled_dates(body, date(2026, 12, 31))
    assert n == 3
    assert b"^^^20261231080000&S~^^^20270101090000&S" in moved
    assert b"|20261231080000&M|" in moved


def test_nothing_scheduled_or_not_a_date_is_left_alone() -> None:
    adt = (SAMPLES / "adt_a08.hl7").read_bytes()
    assert move_scheduled_dates(adt, date(2030, 1, 1)) == (adt, 0)
    odd = MSH + b"\r" + seg("ORC", f1="NW", f7="^^^20261399^^R")
    assert move_scheduled_dates(odd, date(2030, 1, 1)) == (odd, 0)


def test_latin1_bytes_and_line_endings_pass_through() -> None:
    body = (SAMPLES / "orm_latin1.hl7").read_bytes().replace(b"\r", b"\r\n")
    moved, n = move_scheduled_dates(body, date(2026, 12, 1))
    assert n == 1
    assert moved == body.replace(b"202611251100", b"202612011100")
    assert "Müller" in str(Message.parse(moved).get("PID-5"))
