"""`engine send`: a file without a message is an error; --today moves the scheduled start to today."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest

from engine.hl7.ack import build_ack
from engine.hl7.er7 import Message
from engine.hl7.mllp import MLLPServer, start_server

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"


class Receiver:
    """A real MLLP listener in a thread of its own: keeps every body, answers AA."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.server: MLLPServer | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _answer(self, body: bytes, _conn: object) -> bytes:
        self.bodies.append(body)
        return build_ack(Message.parse(body), "AA").encode()

    def start(self) -> int:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(start_server(self._answer, "127.0.0.1", 0),
                                                       self.loop).result(10)
        return self.server.port

    def stop(self) -> None:
        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    yield r
    r.stop()


def _fields(body: bytes, segment: bytes) -> list[list[bytes]]:
    return [s.split(b"|") for s in body.split(b"\r") if s.startswith(segment + b"|")]


def test_a_file_without_a_message_is_an_error_and_nothing_is_sent(cli, receiver: Receiver, tmp_path: Path) -> None:
    empty = tmp_path / "notes.txt"
    empty.write_text("this is not HL7\n")
    to = f"127.0.0.1:{receiver.server.port}"  # type: ignore[union-attr]  # started by the fixture
    out = cli("send", str(SAMPLES / "orm_o01_ct.hl7"), str(empty), "--to", to, code=1)
    assert f"no HL7 message found in {empty}" in cli.flat(out.stderr)
    assert "sent=" not in out.stdout
    assert receiver.bodies == []


def test_today_moves_the_scheduled_start_and_keeps_the_time(cli, receiver: Receiver) -> None:
    to = f"127.0.0.1:{receiver.server.port}"  # type: ignore[union-attr]
    files = [SAMPLES / n for n in ("orm_o01_two_orders.hl7", "omi_o23.hl7", "batch.hl7")]
    before = [f.read_bytes() for f in files]
    out = cli("send", *map(str, files), "--to", to, "--today")
    assert "sent=5" in out.stdout and "AA=5" in out.stdout
    assert [f.read_bytes() for f in files] == before  # the samples stay as shipped
    today = date.today().strftime("%Y%m%d").encode()
    starts = []
    for body in receiver.bodies:
        starts += [f[7].split(b"^")[3] for f in _fields(body, b"ORC")]
        starts += [f[7] for f in _fields(body, b"TQ1")]
        assert _fields(body, b"ORC")[0][9] == b"20261124152500"  # ORC-9 (transaction time) is not a schedule
        assert b"|20261124170000|" in body or b"|20261124153000|" in body  # nor is MSH-7
    assert sorted(starts) == sorted(today + t for t in (b"0900", b"0930", b"1400", b"1400", b"0800", b"0800",
                                                         b"0800"))
    ct = cli("send", str(SAMPLES / "orm_o01_ct.hl7"), "--to", to, "--today").stdout
    assert "MSA|AA|ORM0001" in ct
    obr = _fields(receiver.bodies[-1], b"OBR")[0]
    assert obr[27].split(b"^")[3] == today + b"1000"  # OBR-27.4 moves with ORC-7.4


def test_without_today_the_message_goes_as_written(cli, receiver: Receiver) -> None:
    to = f"127.0.0.1:{receiver.server.port}"  # type: ignore[union-attr]
    cli("send", str(SAMPLES / "omi_o23.hl7"), "--to", to)
    assert receiver.bodies[0].replace(b"\r", b"\n").strip() == (SAMPLES / "omi_o23.hl7").read_bytes().replace(
        b"\r", b"\n").strip()


def test_quick_start_shows_the_sample_items_on_any_day(engine_process) -> None:
    """README quick start: `engine send --today` samples are today's worklist and survive the purge."""
    from sqlalchemy import create_engine

    from engine.runtime.jobs_worklist import purge_worklist

    engine_process.start()
    orders = f"localhost:{engine_process.orders_port}"
    engine_process.cli("send", str(SAMPLES / "orm_o01_ct.hl7"), "--to", orders, "--today")
    engine_process.cli("send", str(SAMPLES / "batch.hl7"), "--to", orders, "-n", "2", "--today")
    today = date.today().isoformat()
    items = [json.loads(line) for line in
             engine_process.cli("worklist", "--date", today, "--json").stdout.splitlines()]
    assert {i["accession_number"] for i in items} == {"ACC1001", "ACC5001", "ACC5011", "ACC5021"}
    db = create_engine(engine_process.env["ENGINE_STORAGE_URL"])
    assert purge_worklist(db, timedelta(hours=72), timedelta(days=7)) == 0  # the engine's own purge, now
    db.dispose()
    assert "ACC1001" in engine_process.cli("worklist", "--modality", "CT").stdout
