"""Property: whatever bytes arrive, in whatever pieces, the engine's MLLP listener answers each
complete frame exactly once (or closes the connection cleanly), keeps serving a well-behaved
sender afterwards, and every frame it answered AA is stored.

The engine runs in a thread with its own event loop so that hypothesis can drive plain blocking
sockets from a synchronous test; the frames a connection should see come from a FrameReader fed
the same bytes in one piece (the framing has its own tests), so the oracle is independent of
how TCP splits the stream.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from engine.hl7.mllp_framing import FrameReader, frame
from engine.runtime.app import EngineApp, default_registry
from engine.runtime.config import load_config
from engine.store.models import Message as StoredMessage

MESSAGES = StoredMessage.__table__
WAIT = 30.0  # a ceiling for one exchange, never an assertion on time
MAX_JUNK = 512
STORED = {"processed", "duplicate", "filtered"}

HOSTILE = [
    b"MSH|^~\\&|RIS|H|E|H|2025||ORM^O01|H-{n}|P|2.5||||||base64\rPID|||1\r",
    b"MSH|^~|&|RIS|H|E|H|2025||ORM^O01|H-{n}|P|2.5\rPID|||1\r",
    b"MSHX^~\\&XRISXHXEXHX2025XXORM^O01XH-{n}XPX2.5\r",
    b"MSH|^~\\&|RIS|H|E|H|2025||ORM^O01|H-{n}|P|2.5||||||UNICODE UTF-16\rPID|||1\r",
    b"MSH|^~\\&|RIS|H|E|H|2025||ORM^O01||P|2.5\rPID|||1\r",  # no MSH-10
    b"BHS|^~\\&|RIS\rMSH|^~\\&|RIS|H|E|H|2025||ORM^O01|H-{n}|P|2.5\rPID|||1\rBTS|1\r",
    b"PID|||no header\r",
    b"MSH",
    b"",
]


def good(cid: str) -> bytes:
    return (
        f"MSH|^~\\&|RIS|HOSP|ENGINE|HOSP|20250101120000||ORM^O01|{cid}|P|2.5\r"
        f"PID|||{cid}^^^HOSP||DOE^JOHN\rORC|NW|{cid}\r"
    ).encode()


# one piece of a stream: a good message, a hostile header, random bytes framed or not, or a flood
piece = st.one_of(
    st.just(("good", b"")),
    st.sampled_from(HOSTILE).map(lambda b: ("hostile", b)),
    st.binary(max_size=48).map(lambda b: ("frame", b)),
    st.binary(max_size=48).map(lambda b: ("junk", b)),
    st.binary(max_size=48).map(lambda b: ("partial", b)),
    st.just(("flood", b"j" * (MAX_JUNK + 64))),
)


class Engine:
    """An EngineApp served from its own thread's event loop."""

    def __init__(self, folder: Path) -> None:
        (folder / "channels").mkdir(parents=True)
        (folder / "mappings").mkdir()
        (folder / "engine.yaml").write_text(
            f"storage:\n  url: sqlite:///{folder / 'e.db'}\ndicom:\n  enabled: false\nlog_level: WARNING\n"
        )
        (folder / "channels" / "c.yaml").write_text(
            f"name: c\nsource: {{type: mllp, port: 0, max_junk_bytes: {MAX_JUNK}}}\naccept: [ORM^O01]\n"
        )
        registry = default_registry()
        self.app = EngineApp(load_config(folder / "engine.yaml", registry, env={}), registry)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.app.start())
        self.port = self.app.port_of("c")

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def stop(self) -> None:
        self.run(self.app.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def junk_closed(self) -> int:
        return int(self.app.channels["c"].source.server.junk_closed)  # type: ignore[attr-defined]

    def status_of(self, control_id: str) -> set[str]:
        with self.app.db.connect() as conn:  # type: ignore[union-attr]
            rows = conn.execute(select(MESSAGES.c.status).where(MESSAGES.c.control_id == control_id))
            return {r.status for r in rows}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(tmp_path_factory.mktemp("mllp-property"))
    yield eng
    eng.stop()


def exchange(port: int, chunks: list[bytes]) -> tuple[list[bytes], bool]:
    """Send the chunks, half-close, read every reply until the server closes: (replies, closed cleanly)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server closed first (junk past the limit): read what it answered
            pass
        reader = FrameReader()
        replies: list[bytes] = []
        clean = True
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                clean = False
                break
            if not data:
                break
            replies += reader.feed(data)
    return replies, clean


def msa(reply: bytes) -> list[tuple[str, str]]:
    """(MSA-1, MSA-2) of each ACK in a reply: one, or several inside a batch answer (BHS ... BTS)."""
    found: list[tuple[str, str]] = []
    fs = "|"
    for seg in reply.decode("latin-1").split("\r"):
        if seg[:3] in ("MSH", "BHS") and len(seg) > 3:
            fs = seg[3]
        elif seg.startswith("MSA"):
            fields = seg.split(fs) + ["", ""]
            found.append((fields[1], fields[2]))
    assert reply.startswith((b"MSH", b"BHS")) and (found or reply.startswith(b"BHS"))
    return found


run_ids = itertools.count()


@settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(pieces=st.lists(piece, max_size=7), cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=6))
def test_every_complete_frame_is_answered_once_and_aa_means_stored(
    engine: Engine, pieces: list[tuple[str, bytes]], cuts: list[int]
) -> None:
    run = f"{next(run_ids)}-{uuid.uuid4().hex[:6]}"
    stream = b""
    goods: dict[bytes, str] = {}
    for n, (kind, data) in enumerate(pieces):
        if kind == "good":
            cid = f"P{run}-{n}"
            body = good(cid)
            goods[body] = cid
            stream += frame(body)
        elif kind == "hostile":
            stream += frame(data.replace(b"{n}", f"{run}-{n}".encode()))
        elif kind == "frame":
            stream += frame(data)
        elif kind == "partial":
            stream += b"\x0b" + data
        else:  # junk and floods: bytes outside a frame (a VT in them would start one)
            stream += data.replace(b"\x0b", b"")
    expected = FrameReader().feed(stream)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points) if b > a]

    closed_for_junk = engine.junk_closed
    replies, clean = exchange(engine.port, chunks)
    closed_for_junk = engine.junk_closed - closed_for_junk

    # exactly one answer per complete frame, in order; fewer only when the connection was closed for junk
    assert len(replies) <= len(expected)
    if len(replies) < len(expected):
        assert closed_for_junk == 1
    assert clean or closed_for_junk
    for body, reply in zip(expected, replies, strict=False):
        acks = msa(reply)
        if body in goods:
            assert acks == [("AA", goods[body])]
        for code, control_id in acks:
            assert code in {"AA", "AE", "AR"}
            if code == "AA":
                assert engine.status_of(control_id) & STORED, f"AA for {control_id} but not stored"

    # and the listener still serves a well-behaved sender
    cid = f"W{run}"
    replies, _ = exchange(engine.port, [frame(good(cid))])
    assert [msa(r) for r in replies] == [[("AA", cid)]]
    assert engine.status_of(cid) == {"processed"}
