"""Hostile MLLP peers against the engine's own listener, over real sockets (issue 11).

Junk outside frames, an idle crowd at max_connections, a frame that would overspend the buffer
budget, MSH-18 naming a codec that is no charset, MSH-1/MSH-2 that break an ACK, and a handler
that raises: every case gets an answer (or a clean close) and the next sender is served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from engine.hl7.ack import fallback_ack
from engine.hl7.er7 import Message
from engine.hl7.mllp import BufferBudget, ConnInfo, MLLPClient, frame, start_server
from engine.runtime.app import EngineApp, default_registry
from engine.runtime.config import load_config
from engine.store.models import Message as StoredMessage

MESSAGES = StoredMessage.__table__
ORM = b"MSH|^~\\&|RIS|HOSP|ENGINE|HOSP|20250101120000||ORM^O01|{cid}|P|2.5{msh18}\rPID|||12345^^^HOSP||DOE^JOHN\r"


WAIT = 10.0  # generous ceiling for "this should happen"; tests never assert on durations


async def until(cond: Callable[[], bool], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


class Raw:
    """A bare TCP peer, to send exactly the bytes a test needs."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", port, limit=2**20))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> bytes:
        data = await asyncio.wait_for(self.reader.readuntil(b"\x1c\r"), WAIT)
        return data[data.index(b"\x0b") + 1 : -2]

    async def closed_by_peer(self) -> bool:
        """True when the server ends the connection without sending anything more."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), WAIT)
        except ConnectionResetError:
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


def orm(cid: str, msh18: str = "") -> bytes:
    return ORM.replace(b"{cid}", cid.encode()).replace(b"{msh18}", f"||||||{msh18}".encode() if msh18 else b"")


async def start(tmp_path: Path, source: str = "", db_url: str | None = None) -> EngineApp:
    (tmp_path / "channels").mkdir(parents=True, exist_ok=True)
    (tmp_path / "mappings").mkdir(exist_ok=True)
    url = db_url or f"sqlite:///{tmp_path / 'e.db'}"
    (tmp_path / "engine.yaml").write_text(f"storage:\n  url: '{url}'\ndicom:\n  enabled: false\n")
    (tmp_path / "channels" / "c.yaml").write_text(
        f"name: c\nsource: {{type: mllp, port: 0{', ' + source if source else ''}}}\naccept: [ORM^O01]\n"
    )
    registry = default_registry()
    app = EngineApp(load_config(tmp_path / "engine.yaml", registry, env={}), registry)
    await app.start()
    return app


@pytest.fixture
async def stop_after() -> AsyncIterator[list[EngineApp]]:
    apps: list[EngineApp] = []
    yield apps
    for app in apps:
        await app.stop()


async def exchange(app: EngineApp, body: bytes) -> bytes:
    async with MLLPClient("127.0.0.1", app.port_of("c"), read_timeout=20) as client:
        return await client.send(body)


def stored(app: EngineApp) -> dict[str, str]:
    with app.db.connect() as conn:  # type: ignore[union-attr]
        return {r.control_id: r.status for r in conn.execute(select(MESSAGES.c.control_id, MESSAGES.c.status))}


def statuses(app: EngineApp) -> list[str]:
    with app.db.connect() as conn:  # type: ignore[union-attr]
        return sorted(r.status for r in conn.execute(select(MESSAGES.c.status)))


def server_of(app: EngineApp) -> Any:
    return app.channels["c"].source.server  # type: ignore[attr-defined]


# -- slots -------------------------------------------------------------------------------------
async def test_junk_is_not_activity_the_idle_timer_still_closes(tmp_path: Path, stop_after: list[EngineApp]) -> None:
    app = await start(tmp_path, "idle_timeout: 0.5, max_junk_bytes: 100000")
    stop_after.append(app)
    raw = await Raw.open(app.port_of("c"))
    closed = asyncio.ensure_future(raw.closed_by_peer())
    sent = 0
    while not closed.done() and sent < 400:  # one junk byte every 50 ms: far more than the idle timeout
        try:
            await raw.send(b"x")
        except OSError:
            break
        sent += 1
        await asyncio.sleep(0.05)
    assert await closed  # closed by the idle timer although bytes kept coming
    assert sent < 400
    assert b"MSA|AA|J-1" in await exchange(app, orm("J-1"))
    await raw.close()


async def test_junk_past_the_limit_closes_the_connection(
    tmp_path: Path, stop_after: list[EngineApp], caplog: pytest.LogCaptureFixture
) -> None:
    app = await start(tmp_path, "max_junk_bytes: 1024")
    stop_after.append(app)
    raw = await Raw.open(app.port_of("c"))
    # junk below the limit between frames is dropped, the frames answered
    await raw.send(b"\r\n garbage " + frame(orm("J-2")) + b"\n" * 500 + frame(orm("J-3")))
    assert b"MSA|AA|J-2" in await raw.reply()
    assert b"MSA|AA|J-3" in await raw.reply()
    with caplog.at_level(logging.WARNING, logger="engine.hl7.mllp"):
        for _ in range(6):  # in pieces: the count runs across reads
            await raw.send(b"DOE JOHN " * 40)
        assert await raw.closed_by_peer()
    assert "outside any frame" in caplog.text and "DOE" not in caplog.text
    assert server_of(app).junk_closed == 1
    assert b"MSA|AA|J-4" in await exchange(app, orm("J-4"))
    await raw.close()


async def test_an_idle_crowd_cannot_lock_the_ris_out(
    tmp_path: Path, stop_after: list[EngineApp], caplog: pytest.LogCaptureFixture
) -> None:
    app = await start(tmp_path, "max_connections: 4")
    stop_after.append(app)
    crowd = [await Raw.open(app.port_of("c")) for _ in range(4)]
    for raw in crowd:
        await raw.send(b"junk")  # junk does not make a connection look alive
    await until(lambda: server_of(app).connections == 4)
    with caplog.at_level(logging.WARNING, logger="engine.hl7.mllp"):
        async with MLLPClient("127.0.0.1", app.port_of("c"), read_timeout=20) as ris:
            for n in range(3):  # the RIS keeps its connection; the crowd makes room each time
                assert b"MSA|AA|R-%d" % n in await ris.send(orm(f"R-{n}"))
            other = MLLPClient("127.0.0.1", app.port_of("c"), read_timeout=20)
            assert b"MSA|AA|R-9" in await other.send(orm("R-9"))
            assert ris.connected  # not the idlest: the crowd went first
            await other.close()
    assert "idle" in caplog.text and "to admit" in caplog.text and "127.0.0.1" in caplog.text
    assert server_of(app).evicted >= 2
    for raw in crowd:
        await raw.close()


async def test_buffer_budget_refuses_with_engine_busy(
    tmp_path: Path, stop_after: list[EngineApp], db_url: str
) -> None:
    app = await start(tmp_path, "max_buffered_bytes: 65536", db_url)
    stop_after.append(app)
    hog = await Raw.open(app.port_of("c"))
    big = orm("B-HOG") + b"NTE|1||" + b"x" * 80_000 + b"\r"
    await hog.send(b"\x0b" + big[:50_000])  # an unfinished frame holds 50 KB of the 64 KB
    await until(lambda: app.channels["c"].source.server.budget.used >= 50_000)  # type: ignore[attr-defined]
    victim = await Raw.open(app.port_of("c"))
    await victim.send(frame(orm("B-1") + b"NTE|1||" + b"y" * 20_000 + b"\r"))
    reply = Message.parse(await victim.reply())
    assert reply.get("MSA-1") == "AR" and reply.get("MSA-2") == "B-1"
    assert reply.get("ERR-3.1") == "207" and "engine busy" in reply.get("MSA-3")
    await victim.send(frame(orm("B-2")))  # a small frame still fits: the connection goes on
    assert b"MSA|AA|B-2" in await victim.reply()
    # the hog's frame grows past the budget: dropped as it comes, answered busy when it ends
    await hog.send(big[50_000:] + b"\x1c\r")
    reply = Message.parse(await hog.reply())
    assert reply.get("MSA-1") == "AR" and reply.get("MSA-2") == "B-HOG"
    await hog.send(frame(orm("B-3")))
    assert b"MSA|AA|B-3" in await hog.reply()
    assert stored(app) == {"B-2": "processed", "B-3": "processed"}  # refused frames are discarded
    for raw in (hog, victim):
        await raw.close()
    await until(lambda: server_of(app).budget.used == 0)


async def test_budget_is_shared_by_every_connection_and_released_on_close() -> None:
    budget = BufferBudget(10_000)

    async def echo(body: bytes, info: ConnInfo) -> bytes:
        return b"ok"

    server = await start_server(echo, "127.0.0.1", 0, budget=budget)
    try:
        first, second = await Raw.open(server.port), await Raw.open(server.port)
        await first.send(b"\x0b" + b"a" * 6000)
        await until(lambda: budget.used == 6000)
        await second.send(b"\x0b" + b"b" * 6000 + b"\x1c\r")
        assert await second.reply() == b"\x15"  # a bare server answers the MLLP NAK byte
        await first.close()
        await until(lambda: budget.used == 0)
        await second.send(frame(b"c" * 6000))
        assert await second.reply() == b"ok"
        await second.close()
    finally:
        await server.close()


# -- every frame answered ------------------------------------------------------------------------
NOT_CHARSETS = ["base64", "rot13", "zlib", "hex", "idna", "unicode_escape", "punycode"]


async def test_msh18_naming_no_text_encoding_is_refused_with_a_readable_ack(
    tmp_path: Path, stop_after: list[EngineApp], db_url: str
) -> None:
    app = await start(tmp_path, db_url=db_url)
    stop_after.append(app)
    async with MLLPClient("127.0.0.1", app.port_of("c"), read_timeout=20) as client:
        for charset in NOT_CHARSETS:
            for cid, body in (
                (f"C-ASCII-{charset}", orm(f"C-ASCII-{charset}", charset)),
                (f"C-LATIN-{charset}", orm(f"C-LATIN-{charset}", charset).replace(b"DOE", "MÜLLER".encode("latin-1"))),
            ):
                ack = Message.parse(await client.send(body))
                assert ack.get("MSA-1") == "AE" and ack.get("MSA-2") == cid
                assert ack.get("ERR-3.1") == "103" and ack.get("ERR-2") == "MSH^1^18^1"
                assert charset not in ack.get("MSH-18")  # the ACK never claims the bogus codec
        assert b"MSA|AA|C-OK" in await client.send(orm("C-OK"))  # same connection, still served
    assert stored(app)["C-OK"] == "processed"
    assert statuses(app) == ["error"] * 2 * len(NOT_CHARSETS) + ["processed"]  # refused ones stored too


async def test_ascii_message_declaring_utf16_gets_an_ascii_ack(
    tmp_path: Path, stop_after: list[EngineApp], db_url: str
) -> None:
    app = await start(tmp_path, db_url=db_url)
    stop_after.append(app)
    reply = await exchange(app, orm("U-1", "UNICODE UTF-16"))
    assert b"\x00" not in reply and reply.startswith(b"MSH|")
    ack = Message.parse(reply)
    assert ack.get("MSA-1") == "AA" and ack.get("MSA-2") == "U-1" and ack.get("MSH-18") == "ASCII"
    latin = await exchange(app, orm("U-2", "8859/1").replace(b"DOE^JOHN", "MÜLLER".encode("latin-1")))
    assert b"MSA|AA|U-2" in latin and b"|8859/1" in latin  # a charset that was used is echoed


@pytest.mark.parametrize(
    ("body", "cid"),
    [
        (b"MSH|^~|&|RIS|HOSP|ENGINE|HOSP|20250101||ORM^O01|M-1|P|2.5\rPID|||1\r", "M-1"),  # MSH-2 holds MSH-1
        (b"MSHX^~\\&XRISXHOSPXENGINEXHOSPX20250101XXORM^O01XM-2XPX2.5\rPIDXXX1\r", "M-2"),  # alnum MSH-1
        (b"MSH|^1\\&|RIS|HOSP|ENGINE|HOSP|20250101||ORM^O01|M-3|P|2.5\rPID|||1\r", "M-3"),  # alnum in MSH-2
        (b"MSH|^^\\&|RIS|HOSP|ENGINE|HOSP|20250101||ORM^O01|M-4|P|2.5\rPID|||1\r", "M-4"),  # repeated
    ],
)
async def test_delimiters_that_break_an_ack_fall_back_to_the_default(
    tmp_path: Path, stop_after: list[EngineApp], body: bytes, cid: str
) -> None:
    app = await start(tmp_path)
    stop_after.append(app)
    reply = await exchange(app, body)
    assert reply.startswith(b"MSH|^~\\&|")
    ack = Message.parse(reply)
    assert ack.get("MSA-1") == "AR" and ack.get("MSA-2") == cid
    assert ack.get("MSH-9.1") == "ACK"


async def test_a_handler_that_raises_gets_a_minimal_ar_and_the_connection_stays(
    tmp_path: Path,
    stop_after: list[EngineApp],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    db_url: str,
) -> None:
    app = await start(tmp_path, db_url=db_url)
    stop_after.append(app)
    source = app.channels["c"].source
    real = source.handle_frame  # type: ignore[attr-defined]

    async def broken(body: bytes, conn: Any = None) -> bytes | None:
        if b"|X-BUG|" in body:
            raise RuntimeError("DOE^JOHN leaked into an exception text")
        return await real(body, conn)

    monkeypatch.setattr(source.server, "handler", broken)  # type: ignore[attr-defined]
    async with MLLPClient("127.0.0.1", app.port_of("c"), read_timeout=20) as client:
        with caplog.at_level(logging.ERROR, logger="engine.hl7.mllp"):
            ack = Message.parse(await client.send(orm("X-BUG")))
        assert ack.get("MSA-1") == "AR" and ack.get("MSA-2") == "X-BUG" and ack.get("ERR-3.1") == "207"
        assert b"MSA|AA|X-OK" in await client.send(orm("X-OK"))  # the same connection
    assert "RuntimeError" in caplog.text and "DOE" not in caplog.text


async def test_fallback_reply_keeps_a_bare_server_connection() -> None:
    async def boom(body: bytes, info: ConnInfo) -> bytes:
        raise ValueError("no")

    server = await start_server(boom, "127.0.0.1", 0, fallback=fallback_ack)
    try:
        raw = await Raw.open(server.port)
        for body in (orm("F-1"), b"not hl7 at all", b""):
            await raw.send(frame(body))
            ack = Message.parse(await raw.reply())
            assert ack.get("MSA-1") == "AR"
            assert ack.get("MSA-2") == ("F-1" if body.startswith(b"MSH") else "")
        await raw.close()
    finally:
        await server.close()
