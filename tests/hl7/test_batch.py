from __future__ import annotations

from pathlib import Path

from engine.hl7.batch import split_batch, split_batch_bytes
from engine.hl7.er7 import Message

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "hl7"


def test_batch_file_wrappers_stripped() -> None:
    msgs = split_batch((SAMPLES / "batch.hl7").read_bytes().decode("ascii"))
    assert len(msgs) == 3
    parsed = [Message.parse(m) for m in msgs]
    assert [m.control_id for m in parsed] == ["BAT0001", "BAT0002", "BAT0003"]
    assert all(len(m.segments()) == 5 for m in parsed)
    assert not any(s in m for m in msgs for s in ("FHS", "BHS", "BTS", "FTS"))
    assert all(m.endswith("\r") and "\n" not in m for m in msgs)


def test_plain_concatenation_with_mixed_terminators() -> None:
    a = (SAMPLES / "adt_a08.hl7").read_bytes().decode("ascii")
    b = (SAMPLES / "adt_a40.hl7").read_bytes().decode("ascii").replace("\r", "\r\n")
    c = (SAMPLES / "oru_r01.hl7").read_bytes().decode("ascii").replace("\r", "\n")
    msgs = split_batch(a + "\n\n" + b + c)
    assert [Message.parse(m).control_id for m in msgs] == ["ADT0001", "ADT0002", "ORU0001"]
    assert msgs[0] == a


def test_junk_before_first_msh_and_empty_input() -> None:
    assert split_batch("") == []
    assert split_batch("\r\n\r\n") == []
    msgs = split_batch("garbage line\rMSH|^~\\&|A|B|C|D|||ADT^A08|1|P|2.5\rPID|1\r")
    assert msgs == ["MSH|^~\\&|A|B|C|D|||ADT^A08|1|P|2.5\rPID|1\r"]


def test_bytes_keep_each_message_charset() -> None:
    latin = (SAMPLES / "orm_latin1.hl7").read_bytes()
    utf8 = "MSH|^~\\&|A|B|C|D|||ADT^A08|U1|P|2.5||||||UNICODE UTF-8\rPID|1||1||Jürgen\r".encode()
    parts = split_batch_bytes(b"FHS|^~\\&\nBHS|^~\\&\n" + latin + utf8 + b"BTS|2\nFTS|1\n")
    assert len(parts) == 2
    assert Message.parse(parts[0]).get("PID-5.1") == "Müller"
    assert Message.parse(parts[1]).get("PID-5.1") == "Jürgen"
