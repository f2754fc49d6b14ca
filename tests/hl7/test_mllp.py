"""MLLP server and client over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import hl7
import pytest
from hl7.mllp import open_hl7_connection

from engine.hl7.mllp import (
    COMMIT_ACK,
    ConnInfo,
    MLLPClient,
    MLLPError,
    MLLPServer,
    MLLPTimeout,
    frame,
    start_server,
)

MSG = b"MSH|^~\\&|RIS|HOSP|ENGINE|HOSP|20250101120000||ORM^O01|MSG0001|P|2.5\rPID|||12345^^^HOSP||DOE^JOHN\r"
WAIT = 10.0  # generous ceiling for "this should happen"; tests never assert on durations


async def echo(body: bytes, info: ConnInfo) -> bytes:
    return b"ACK:" + body


async def until(cond: Callable[[], bool], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


class Raw:
    """A bare TCP peer, to send exactly the bytes a test needs."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, limit: int = 2**16) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", port, limit=limit))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> bytes:
        data = await asyncio.wait_for(self.reader.readuntil(b"\x1c\r"), WAIT)
        start = data.index(b"\x0b")
        return data[start + 1 : -2]

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


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[MLLPServer]]]:
    servers: list[MLLPServer] = []

    async def _start(
        handler: Callable[[bytes, ConnInfo], Awaitable[bytes | None]] = echo, **kwargs: object
    ) -> MLLPServer:
        server = await start_server(handler, "127.0.0.1", 0, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield _start
    for server in servers:
        await server.close()


async def test_echo_with_client(serve: Callable[..., Awaitable[MLLPServer]]) -> None:
    server = await serve()
    assert server.port > 0
    async with MLLPClient("127.0.0.1", server.port) as client:
        assert await client.send(MSG) == b"ACK:" + MSG
        assert await client.send(b"second") == b"ACK:second"
        assert server.connections == 1


async def test_split_frame_across_many_writes(serve: Callable[..., Awaitable[MLLPServer]]) -> None:
    server = await serve()
    raw = await Raw.open(server.port)
    data = frame(MSG)
    for i in range(0, len(data), 7):
        await raw.send(data[i : i + 7])
        await asyncio.sleep(0.001)
    assert await raw.reply() == b"ACK:" + MSG
    await raw.close()


async def test_many_frames_in_one_write_answered_in_order_one_at_a_time(
    serve: Callable[..., Awaitable[MLLPServer]],
) -> None:
    in_flight = 0
    most = 0

    async def slow(body: bytes, info: ConnInfo) -> bytes:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.002 * (int(body) % 3))
        in_flight -= 1
        return b"R" + body

    server = await serve(slow)
    raw = await Raw.open(server.port)
    count = 150  # past the point where the server stops reading to let handlers catch up
    await raw.send(b"".join(frame(str(i).encode()) for i in range(count)))
    replies = [await raw.reply() for _ in range(count)]
    assert replies == [b"R" + str(i).encode() for i in range(count)]
    assert most == 1
    await raw.close()


async def test_many_connections_at_once(serve: Callable[..., Awaitable[MLLPServer]]) -> None:
    seen: set[int] = set()

    async def handler(body: bytes, info: ConnInfo) -> bytes:
        seen.add(info.id)
        await asyncio.sleep(0)
        return body

    server = await serve(handler)
    clients = [MLLPClient("127.0.0.1", server.port) for _ in range(8)]

    async def run(n: int, client: MLLPClient) -> list[bytes]:
        return [await client.send(f"{n}-{i}".encode()) for i in range(50)]

    results = await asyncio.gather(*(run(n, c) for n, c in enumerate(clients)))
    for n, replies in enumerate(results):
        assert replies == [f"{n}-{i}".encode() for i in range(50)]
    assert len(seen) == 8
    for client in clients:
        await client.close()


async def test_garbage_outside_frames_is_ignored(serve: Callable[..., Awaitable[MLLPServer]]) -> None:
    server = await serve()
    raw = await Raw.open(server.port)
    await raw.send(b"hello\r\n" + frame(b"one") + b"\x1c\r\n\x00" + frame(b"two") + b"trailing")
    assert await raw.reply() == b"ACK:one"
    assert await raw.reply() == b"ACK:two"
    await raw.send(frame(b"three"))
    assert await raw.reply() == b"ACK:three"
    await raw.close()


async def test_oversize_frame_closes_only_that_connection(
    serve: Callable[..., Awaitable[MLLPServer]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    handled: list[bytes] = []

    async def handler(body: bytes, info: ConnInfo) -> bytes:
        handled.append(body)
        return b"ok"

    server = await serve(handler, max_frame=1000)
    good = await Raw.open(server.port)
    bad = await Raw.open(server.port)
    with caplog.at_level(logging.WARNING, logger="engine.hl7.mllp"):
        await bad.send(b"\x0b" + b"A" * 600)
        await bad.send(b"A" * 600)
        assert await bad.closed_by_peer()
    assert handled == []
    assert "frame over 1000 bytes" in caplog.text
    await good.send(frame(b"x" * 1000))
    assert await good.reply() == b"ok"
    await good.close()
    await bad.close()


async def test_idle_connection_is_closed(serve: Callable[..., Awaitable[MLLPServer]]) -> None:
    server = await serve(idle_timeout=0.2)
    raw = await Raw.open(server.port)
    assert await raw.closed_by_peer()
    await until(lambda: server.connections == 0)
    await raw.close()


async def test_idle_timeout_does_not_close_a_busy_connection(
    serve: Callable[..., Awaitable[MLLPServer]],
) -> None:
    async def slow(body: bytes, info: ConnInfo) -> bytes:
        await asyncio.sleep(0.5)
        return b"done"

    server = await serve(slow, idle_timeout=0.1)
    async with MLLPClient("127.0.0.1", server.port) as client:
        assert await client.send(b"x") == b"done"


async def test_truncated_frame_then_silence_hits_read_timeout(
    serve: Callable[..., Awaitable[MLLPServer]],
) -> None:
    handled: list[bytes] = []

    async def handler(body: bytes, info: ConnInfo) -> bytes:
        handled.append(body)
        return b"ok"

    server = await serve(handler, read_timeout=0.2, idle_timeout=None)
    raw = await Raw.open(server.port)
    await raw.send(b"\x0bMSH|^~\\&|partial")
    assert await raw.closed_by_peer()
    assert handled == []
    await raw.close()


async def test_slow_drip_frame_is_abandoned_even_while_bytes_keep_coming(
    serve: Callable[..., Awaitable[MLLPServer]],
) -> None:
    server = await serve(read_timeout=0.3, idle_timeout=None)
    raw = await Raw.open(server.port)
    await raw.send(b"\x0b")
    closed = False
    for _ in range(int(WAIT / 0.05)):
        try:
            await raw.send(b"x")
        except (ConnectionError, OSError):
            closed = True
            break
        if raw.reader.at_eof():
            closed = True
            break
        await asyncio.sleep(0.05)
    assert closed
    await raw.close()


async def test_client_leaving_before_its_reply_does_not_disturb_others(
    serve: Callable[..., Awaitable[MLLPServer]],
) -> None:
    release = asyncio.Event()

    async def handler(body: bytes, info: ConnInfo) -> bytes:
        if body == b"wait":
            await release.wait()
        return b"ACK:" + body

    server = await serve(handler)
    leaver = await Raw.open(server.port)
    await leaver.send(frame(b"wait") + frame(b"queued"))
    await until(lambda: server.connections == 1)
    await leaver.close()
    await asyncio.sleep(0.05)
    release.set()
    async with MLLPClient("127.0.0.1", server.port) as client:
        assert await client.send(b"other") == b"ACK:other"
        await until(lambda: server.connections == 1)


async def test_half_closed_peer_gets_its_answers_then_the_connection_ends(
    serve: Callable[..., Awaitable[MLLPServer]],
) -> None:
    server = await serve()
    raw = await Raw.open(server.port)
    await raw.send(frame(b"a") + frame(b"b"))
    raw.writer.write_eof()
    assert await raw.reply() == b"ACK:a"
    assert await raw.reply() == b"ACK:b"
    assert await raw.closed_by_peer()
    await raw.close()


async def test_max_connections_admits_a_new_sender_by_closing_the_idlest(
    serve: Callable[..., Awaitable[MLLPServer]], caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve(max_connections=2)
    first = MLLPClient("127.0.0.1", server.port)
    second = MLLPClient("127.0.0.1", server.port)
    assert await first.send(b"1") == b"ACK:1"
    assert await second.send(b"2") == b"ACK:2"
    with caplog.at_level(logging.WARNING, logger="engine.hl7.mllp"):
        extra = await Raw.open(server.port)
        await extra.send(frame(MSG))
        assert await extra.reply() == b"ACK:" + MSG
    assert "idle" in caplog.text and "closing connection 1 " in caplog.text
    assert "DOE" not in caplog.text
    assert server.connections == 2 and server.evicted == 1
    await until(lambda: not first.connected)  # the idlest was closed (its client reconnects on its next send)
    assert second.connected
    assert await second.send(b"again") == b"ACK:again"
    for client in (first, second):
        await client.close()
    await extra.close()


async def test_max_connections_refuses_when_every_connection_is_busy(
    serve: Callable[..., Awaitable[MLLPServer]], caplog: pytest.LogCaptureFixture
) -> None:
    gate = asyncio.Event()

    async def slow(body: bytes, info: ConnInfo) -> bytes:
        await gate.wait()
        return b"ACK:" + body

    server = await serve(slow, max_connections=1)
    busy = await Raw.open(server.port)
    await busy.send(frame(b"held"))
    await until(lambda: server.connections == 1)
    with caplog.at_level(logging.WARNING, logger="engine.hl7.mllp"):
        extra = await Raw.open(server.port)
        assert await extra.closed_by_peer()
    assert "refusing connection" in caplog.text
    gate.set()
    assert await busy.reply() == b"ACK:held"
    for raw in (busy, extra):
        await raw.close()


async def test_handler_exception_closes_only_that_connection(
    serve: Callable[..., Awaitable[MLLPServer]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(body: bytes, info: ConnInfo) -> bytes:
        if body.startswith(b"MSH"):
            raise ValueError(f"cannot handle {body!r}")
        return b"ok"

    server = await serve(handler)
    other = MLLPClient("127.0.0.1", server.port)
    assert await other.send(b"x") == b"ok"
    raw = await Raw.open(server.port)
    with caplog.at_level(logging.ERROR, logger="engine.hl7.mllp"):
        await raw.send(frame(MSG) + frame(b"after"))
        assert await raw.closed_by_peer()
    assert "ValueError" in caplog.text
    assert "DOE" not in caplog.text and "12345" not in caplog.text
    assert await other.send(b"y") == b"ok"
    await raw.close()
    await other.close()


async def test_handler_returning_none_sends_nothing_and_commit_ack_is_framed(
    serve: Callable[..., Awaitable[MLLPServer]],
) -> None:
    async def handler(body: bytes, info: ConnInfo) -> bytes | None:
        return None if body == b"silent" else COMMIT_ACK

    server = await serve(handler)
    raw = await Raw.open(server.port)
    await raw.send(frame(b"silent") + frame(b"commit"))
    assert await raw.reply() == COMMIT_ACK
    await raw.close()


async def test_accepted_sockets_have_keepalive_and_nodelay(
    serve: Callable[..., Awaitable[MLLPServer]],
) -> None:
    server = await serve()
    async with MLLPClient("127.0.0.1", server.port) as client:
        await client.send(b"x")
        (conn,) = server._conns
        sock = conn._transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


async def test_server_close_closes_open_connections(serve: Callable[..., Awaitable[MLLPServer]]) -> None:
    server = await serve()
    raw = await Raw.open(server.port)
    await raw.send(frame(b"x"))
    assert await raw.reply() == b"ACK:x"
    await server.close()
    assert await raw.closed_by_peer()
    assert server.connections == 0
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)
    await raw.close()


async def test_server_close_lets_the_frame_in_flight_finish(
    serve: Callable[..., Awaitable[MLLPServer]],
) -> None:
    started = asyncio.Event()

    async def handler(body: bytes, info: ConnInfo) -> bytes:
        started.set()
        await asyncio.sleep(0.1)
        return b"finished"

    server = await serve(handler)
    raw = await Raw.open(server.port)
    await raw.send(frame(b"x"))
    await started.wait()
    await server.close()
    assert await raw.reply() == b"finished"
    await raw.close()


# -- client ------------------------------------------------------------------------------------
async def test_client_read_timeout_then_reconnects(serve: Callable[..., Awaitable[MLLPServer]]) -> None:
    conn_ids: list[int] = []

    async def handler(body: bytes, info: ConnInfo) -> bytes:
        conn_ids.append(info.id)
        if body == b"hang":
            await asyncio.sleep(WAIT * 3)
        return b"ACK:" + body

    server = await serve(handler)
    client = MLLPClient("127.0.0.1", server.port, read_timeout=0.2)
    with pytest.raises(MLLPTimeout) as info:
        await client.send(b"hang")
    assert isinstance(info.value, MLLPError)
    assert info.value.may_have_been_delivered
    assert await client.send(b"next") == b"ACK:next"
    assert len(set(conn_ids)) == 2  # the timed-out connection was dropped, not reused
    await client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_client_connection_refused_is_not_a_timeout() -> None:
    client = MLLPClient("127.0.0.1", free_port(), connect_timeout=2)
    with pytest.raises(MLLPError) as info:
        await client.send(MSG)
    assert not isinstance(info.value, MLLPTimeout)
    assert not info.value.may_have_been_delivered
    await client.close()


async def test_client_reconnects_after_server_restart() -> None:
    server = await start_server(echo, "127.0.0.1", 0)
    port = server.port
    client = MLLPClient("127.0.0.1", port, connect_timeout=2)
    try:
        assert await client.send(b"1") == b"ACK:1"
        await server.close()
        with pytest.raises(MLLPError):
            await client.send(b"2")
        server = await start_server(echo, "127.0.0.1", port)
        assert await client.send(b"3") == b"ACK:3"
    finally:
        await client.close()
        await server.close()


async def test_client_reconnects_after_idle_close(serve: Callable[..., Awaitable[MLLPServer]]) -> None:
    server = await serve(idle_timeout=0.1)
    async with MLLPClient("127.0.0.1", server.port) as client:
        assert await client.send(b"1") == b"ACK:1"
        await until(lambda: server.connections == 0)
        await until(lambda: not client.connected)
        assert await client.send(b"2") == b"ACK:2"


async def test_client_send_many(serve: Callable[..., Awaitable[MLLPServer]]) -> None:
    server = await serve()
    async with MLLPClient("127.0.0.1", server.port) as client:
        assert await client.send_many([b"a", b"b"]) == [b"ACK:a", b"ACK:b"]


# -- interop -----------------------------------------------------------------------------------
async def test_python_hl7_client_talks_to_our_server(serve: Callable[..., Awaitable[MLLPServer]]) -> None:
    async def ack(body: bytes, info: ConnInfo) -> bytes:
        control_id = body.split(b"\r", 1)[0].split(b"|")[9]
        return (
            b"MSH|^~\\&|ENGINE|HOSP|RIS|HOSP|20250101120001||ACK^O01^ACK|A"
            + control_id
            + b"|P|2.5\rMSA|AA|"
            + control_id
            + b"\r"
        )

    server = await serve(ack)
    reader, writer = await open_hl7_connection("127.0.0.1", server.port)
    try:
        writer.writemessage(hl7.parse(MSG.decode()))
        await writer.drain()
        reply = await asyncio.wait_for(reader.readmessage(), WAIT)
        assert str(reply.segment("MSA")[1]) == "AA"
        assert str(reply.segment("MSA")[2]) == "MSG0001"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_handler_returning_a_non_bytes_reply_closes_the_connection(
    serve: Callable[..., Awaitable[MLLPServer]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(body: bytes, info: ConnInfo) -> bytes:
        return "text, not bytes"  # type: ignore[return-value]

    server = await serve(handler)
    raw = await Raw.open(server.port)
    with caplog.at_level(logging.ERROR, logger="engine.hl7.mllp"):
        await raw.send(frame(b"x"))
        assert await raw.closed_by_peer()
    assert "TypeError" in caplog.text
    await raw.close()


async def test_peer_that_reads_late_gets_every_large_reply_in_order(
    serve: Callable[..., Awaitable[MLLPServer]],
) -> None:
    async def big(body: bytes, info: ConnInfo) -> bytes:
        return body * 200_000  # ~1 MB per reply, far beyond the socket buffers

    server = await serve(big)
    raw = await Raw.open(server.port, limit=2**24)  # readuntil must hold a whole 1 MB frame
    bodies = [f"{i:04d}|".encode() for i in range(12)]
    await raw.send(b"".join(frame(b) for b in bodies))
    async with MLLPClient("127.0.0.1", server.port) as other:  # the server is not stuck
        assert await other.send(b"o") == b"o" * 200_000
    for body in bodies:
        assert await raw.reply() == body * 200_000
    await raw.close()
