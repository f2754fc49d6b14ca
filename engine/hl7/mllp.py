"""MLLP over TCP (optionally TLS): an asyncio server and a client, both bytes-only.

The server is a Protocol rather than streams because it is the engine's hot path. Each connection
handles its frames one at a time, in order, by awaiting the handler; connections are independent,
so a broken, slow, oversized or silent peer only ever costs its own connection. Logs carry peer
addresses, sizes and exception types, never message content (it is PHI).

Hostile peers cannot lock others out: bytes outside a frame are junk (counted, never activity,
and past `max_junk` the connection is closed); at `max_connections` the connection idle longest
makes room for a new one (a real RIS keeps one connection open for days, so a short idle timeout
is no answer); frame bytes held by all connections of the process share one `BufferBudget`, and
a frame that would overspend it is dropped as it arrives and answered with the `busy` reply.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl as _ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from engine.hl7.mllp_framing import (
    COMMIT_ACK,
    COMMIT_NAK,
    DEFAULT_MAX_FRAME,
    END_BLOCK,
    START_BLOCK,
    FrameReader,
    FrameTooLarge,
    MLLPError,
    SkippedFrame,
    frame,
)

__all__ = [
    "COMMIT_ACK",
    "COMMIT_NAK",
    "DEFAULT_MAX_BUFFERED",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_JUNK",
    "PROCESS_BUDGET",
    "BufferBudget",
    "END_BLOCK",
    "START_BLOCK",
    "ConnInfo",
    "FrameReader",
    "FrameTooLarge",
    "Handler",
    "MLLPClient",
    "MLLPError",
    "MLLPServer",
    "MLLPTimeout",
    "client_ssl_context",
    "frame",
    "server_ssl_context",
    "start_server",
]

log = logging.getLogger(__name__)

_QUEUE_HIGH = 64  # frames waiting on one connection before we stop reading from it
_HEAD = 2048  # bytes of a refused frame kept to name it in the NAK (its MSH)
DEFAULT_MAX_JUNK = 4096  # bytes outside any frame, since the last frame, before the connection closes
DEFAULT_MAX_BUFFERED = 256 * 2**20


class BufferBudget:
    """Frame bytes held in memory by every MLLP connection of the process, against one limit.

    Each server registers the limit it was configured with; the smallest registered one applies
    (a server that closes takes its limit away), DEFAULT_MAX_BUFFERED when none is.
    """

    def __init__(self, default: int = DEFAULT_MAX_BUFFERED) -> None:
        self.default = default
        self.used = 0
        self._limits: dict[int, int] = {}

    @property
    def limit(self) -> int:
        return min(self._limits.values()) if self._limits else self.default

    def register(self, owner: object, limit: int) -> None:
        self._limits[id(owner)] = limit

    def unregister(self, owner: object) -> None:
        self._limits.pop(id(owner), None)


PROCESS_BUDGET = BufferBudget()

ReplyBuilder = Callable[[bytes], bytes | None]


class MLLPTimeout(MLLPError):
    """No reply within read_timeout: the message may or may not have been processed."""

    may_have_been_delivered = True


@dataclass(slots=True)
class ConnInfo:
    """What a handler may know about the connection a frame came on (no secrets, no PHI)."""

    id: int
    peer: tuple[Any, ...] | None
    tls: bool = False
    peer_cert: dict[str, Any] | None = None  # the verified client certificate, under mutual TLS


Handler = Callable[[bytes, ConnInfo], Awaitable[bytes | None]]


def _tune_socket(sock: socket.socket | None, keepalive: bool) -> None:
    """NODELAY so replies are not held by Nagle; keepalive so half-open peers are found."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 5)):
                opt = getattr(socket, name, None)
                if opt is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    except OSError:  # the peer may already be gone; nothing to tune then
        pass


class _ServerConnection(asyncio.Protocol):
    """One accepted connection: frames in, handler awaited per frame, replies out in order."""

    def __init__(self, server: MLLPServer) -> None:
        self._server = server
        self._loop = server._loop
        self._reader = FrameReader(server.max_frame)
        self._queue: deque[bytes] = deque()
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._info: ConnInfo | None = None
        self._closed = False
        self._stopping = False  # the server is closing: answer the frame in flight, take no more
        self._eof = False
        self._counted = False
        self._paused_reading = False
        self._can_write: asyncio.Future[None] | None = None
        self._last = 0.0  # last time bytes arrived or a reply went out
        self._frame_start = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._junk_mark = 0  # reader.discarded when the last frame completed
        self._held = 0  # bytes of complete frames queued or being handled
        self._charged = 0  # what this connection has charged to the buffer budget
        self.lost: asyncio.Future[None] = self._loop.create_future()

    # -- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        server = self._server
        peer = transport.get_extra_info("peername")
        if len(server._conns) >= server.max_connections and not server._evict_for(peer):
            log.warning(
                "MLLP %s: refusing connection from %s, %d connections open and none idle",
                server.port,
                peer,
                len(server._conns),
            )
            self._closed = True
            transport.close()
            return
        _tune_socket(transport.get_extra_info("socket"), server.keepalive)
        ssl_obj = transport.get_extra_info("ssl_object")
        cert = ssl_obj.getpeercert() if ssl_obj is not None else None
        self._info = ConnInfo(next(server._ids), peer, ssl_obj is not None, cert or None)
        server._conns.add(self)
        self._counted = True
        self._last = self._loop.time()
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._closed or self._stopping:
            return
        reader = self._reader
        was_in_frame = reader.in_frame
        try:
            frames = reader.feed(data)
        except FrameTooLarge as exc:
            log.warning(
                "MLLP %s: closing connection %s from %s: frame over %d bytes",
                self._server.port,
                self._id,
                self._peer,
                exc.limit,
            )
            self._close()
            return
        server = self._server
        junk = reader.discarded - self._junk_mark
        if frames:
            self._junk_mark = reader.discarded
        elif not (reader.in_frame or was_in_frame):
            # junk only: not activity (the idle timer runs on), and too much of it ends the connection
            if junk > server.max_junk:
                server.junk_closed += 1
                log.warning(
                    "MLLP %s: closing connection %s from %s: %d bytes outside any frame",
                    server.port,
                    self._id,
                    self._peer,
                    junk,
                )
                self._close()
            return
        now = self._last = self._loop.time()
        if frames or reader.in_frame:
            frames = self._spend(frames)
        if frames:
            self._queue.extend(frames)
            if self._task is None:
                self._task = self._loop.create_task(self._drain())
            if len(self._queue) > _QUEUE_HIGH and not self._paused_reading:
                self._paused_reading = True
                self._transport.pause_reading()  # type: ignore[union-attr]  # set by connection_made before any data
        if reader.in_frame and (frames or not was_in_frame):
            self._frame_start = now
            deadline = self._deadline()
            if deadline is not None and deadline < self._timer_when:
                self._arm()

    def _spend(self, frames: list[bytes]) -> list[bytes]:
        """Charge new frame bytes to the budget; over it, drop them (kept: each frame's head, for the NAK)."""
        budget = self._server.budget
        reader = self._reader
        fresh = sum(len(f) for f in frames if not isinstance(f, SkippedFrame))
        want = reader.pending + self._held + fresh
        if want > self._charged and budget.used + want - self._charged > budget.limit:
            refused = 0
            kept: list[bytes] = []
            for f in frames:
                if isinstance(f, SkippedFrame):
                    kept.append(f)
                    continue
                head = SkippedFrame(f[:_HEAD])
                head.size = len(f)
                kept.append(head)
                refused += 1
            if reader.in_frame and reader.pending:
                reader.skip_frame(_HEAD)
                refused += 1
            frames, fresh = kept, 0
            want = reader.pending + self._held
            self._server.busy_refused += refused
            log.warning(
                "MLLP %s: buffer budget of %d bytes spent (%d in use); refusing %d frame(s) on connection %s from %s",
                self._server.port,
                budget.limit,
                budget.used,
                refused,
                self._id,
                self._peer,
            )
        self._held += fresh
        budget.used += want - self._charged
        self._charged = want
        return frames

    def _recharge(self) -> None:
        want = self._reader.pending + self._held
        self._server.budget.used += want - self._charged
        self._charged = want

    def eof_received(self) -> bool:
        # The peer is done sending (or half-open); answer what is queued, then close.
        self._eof = True
        if self._task is None:
            self._close()
            return False
        return self._info is None or not self._info.tls  # TLS cannot stay half-open

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._queue.clear()
        if self._timer is not None:
            self._timer.cancel()
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)
        if self._counted:
            self._server._conns.discard(self)
        self._server.budget.used -= self._charged
        self._charged = self._held = 0
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        if self._can_write is None or self._can_write.done():
            self._can_write = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    # -- work --------------------------------------------------------------------------------
    async def _drain(self) -> None:
        """Answer queued frames one by one, in arrival order."""
        server = self._server
        handler = server.handler
        queue = self._queue
        info = self._info
        assert info is not None
        try:
            while queue and not self._closed:
                body = queue.popleft()
                try:
                    if isinstance(body, SkippedFrame):
                        reply = server.busy(body) if server.busy is not None else COMMIT_NAK
                    else:
                        reply = await handler(body, info)
                    if self._closed:
                        return
                    if reply is not None:
                        self._transport.write(b"\x0b" + reply + b"\x1c\x0d")  # type: ignore[union-attr]  # set by connection_made before any data
                except Exception as exc:  # only the type: the text may quote the message (PHI)
                    reply = self._fallback(body, exc)
                    if reply is None:
                        self._close()
                        return
                    if self._closed:
                        return
                    self._transport.write(b"\x0b" + reply + b"\x1c\x0d")  # type: ignore[union-attr]  # set by connection_made before any data
                finally:
                    if not isinstance(body, SkippedFrame):
                        self._held -= len(body)
                    if not self._closed:
                        self._recharge()
                if reply is not None:
                    if self._can_write is not None and not self._can_write.done():
                        await self._can_write  # the peer is not reading; do not buffer without end
                self._last = self._loop.time()
                if self._paused_reading and len(queue) <= _QUEUE_HIGH // 2 and not (self._closed or self._stopping):
                    self._paused_reading = False
                    self._transport.resume_reading()  # type: ignore[union-attr]  # set by connection_made before any data
        finally:
            self._task = None
        if self._eof:
            self._close()

    def _fallback(self, body: bytes, exc: Exception) -> bytes | None:
        """The safety net: a handler raised, so answer what `fallback` builds and keep the connection."""
        server = self._server
        fallback = server.fallback
        reply: bytes | None = None
        if fallback is not None:
            try:
                reply = fallback(body)
            except Exception:  # the net itself failed: nothing sensible to send any more
                reply = None
            if not isinstance(reply, bytes):
                reply = None
        log.error(
            "MLLP %s: handler raised %s on connection %s; %s",
            server.port,
            type(exc).__name__,
            self._id,
            "answered the fallback reply" if reply is not None else "closing it",
        )
        return reply

    # -- timeouts ----------------------------------------------------------------------------
    def _deadline(self) -> float | None:
        server = self._server
        if self._reader.in_frame and server.read_timeout is not None:
            return self._frame_start + server.read_timeout
        if self._task is not None or self._queue:
            return None  # a handler is at work; its duration is the handler's business
        if server.idle_timeout is not None:
            return self._last + server.idle_timeout
        return None

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._closed:
            return
        deadline = self._deadline()
        if deadline is None:
            # Nothing to time now; look again later in case the state changed.
            step = self._server.idle_timeout or self._server.read_timeout
            if step is None:
                self._timer_when = float("inf")
                return
            deadline = self._loop.time() + step
        self._timer_when = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        deadline = self._deadline()
        if deadline is not None and self._loop.time() >= deadline:
            what = "unfinished frame (read timeout)" if self._reader.in_frame else "idle timeout"
            log.info("MLLP %s: closing connection %s from %s: %s", self._server.port, self._id, self._peer, what)
            self._close()
            return
        self._arm()

    # -- helpers -----------------------------------------------------------------------------
    @property
    def _id(self) -> int | None:
        return self._info.id if self._info else None

    @property
    def _peer(self) -> Any:
        return self._info.peer if self._info else None

    @property
    def _idle(self) -> bool:
        """Nothing in flight: no started frame, nothing queued or being answered."""
        return not (self._closed or self._reader.in_frame or self._queue or self._task is not None)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()

    def _abort(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()


class MLLPServer:
    """A listening MLLP endpoint; `port` is the bound port, `connections` the open ones."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_frame: int,
        read_timeout: float | None,
        idle_timeout: float | None,
        max_connections: int,
        keepalive: bool,
        max_junk: int = DEFAULT_MAX_JUNK,
        budget: BufferBudget | None = None,
        busy: ReplyBuilder | None = None,
        fallback: ReplyBuilder | None = None,
    ) -> None:
        self.handler = handler
        self.max_frame = max_frame
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.keepalive = keepalive
        self.max_junk = max_junk
        self.budget = budget if budget is not None else PROCESS_BUDGET
        self.busy = busy  # reply to a frame refused for the budget (None: the MLLP NAK byte)
        self.fallback = fallback  # reply when the handler raised (None: close the connection)
        # counters, for tests and operators
        self.evicted = 0
        self.junk_closed = 0
        self.busy_refused = 0
        self.port = 0
        self._loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None
        self._conns: set[_ServerConnection] = set()
        self._ids = itertools.count(1)

    @property
    def connections(self) -> int:
        return len(self._conns)

    def _evict_for(self, peer: Any) -> bool:
        """Close the connection idle longest to admit `peer`; False when every connection is busy."""
        idle = [c for c in self._conns if c._idle]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c._last)
        now = self._loop.time()
        log.warning(
            "MLLP %s: %d connections open; closing connection %s from %s, idle %.0f s, to admit %s",
            self.port,
            len(self._conns),
            victim._id,
            victim._peer,
            now - victim._last,
            peer,
        )
        self._conns.discard(victim)
        victim._counted = False
        victim._close()
        self.evicted += 1
        return True

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight handlers finish (up to `grace` s), close every connection."""
        self.budget.unregister(self)
        if self._server is not None:
            self._server.close()
        conns = list(self._conns)
        for conn in conns:
            conn._stopping = True
            conn._queue.clear()  # frames not yet started go unanswered; the sender resends them
        tasks = [c._task for c in conns if c._task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for conn in conns:
            conn._close()
        lost = [c.lost for c in conns]
        if lost:
            await asyncio.wait(lost, timeout=1.0)
            for conn in conns:
                if not conn.lost.done():
                    conn._abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> MLLPServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def start_server(
    handler: Handler,
    host: str,
    port: int,
    *,
    ssl: _ssl.SSLContext | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
    read_timeout: float | None = 30,
    idle_timeout: float | None = 600,
    max_connections: int = 256,
    keepalive: bool = True,
    max_junk: int = DEFAULT_MAX_JUNK,
    max_buffered: int | None = None,
    budget: BufferBudget | None = None,
    busy: ReplyBuilder | None = None,
    fallback: ReplyBuilder | None = None,
) -> MLLPServer:
    """Listen for MLLP on host:port (0 = any free port); `handler` answers each frame body.

    `max_buffered` limits the frame bytes held by all connections sharing `budget` (the process's,
    by default); `busy(head)` answers a frame refused for it, `fallback(body)` one whose handler raised.
    """
    server = MLLPServer(
        handler,
        max_frame=max_frame,
        read_timeout=read_timeout,
        idle_timeout=idle_timeout,
        max_connections=max_connections,
        keepalive=keepalive,
        max_junk=max_junk,
        budget=budget,
        busy=busy,
        fallback=fallback,
    )
    if max_buffered is not None:
        server.budget.register(server, max_buffered)
    loop = asyncio.get_running_loop()
    server._server = await loop.create_server(
        lambda: _ServerConnection(server),
        host,
        port,
        ssl=ssl,
        reuse_address=True,
        backlog=512,
        ssl_handshake_timeout=read_timeout if ssl is not None else None,
    )
    server.port = server._server.sockets[0].getsockname()[1]
    return server


# -- client ------------------------------------------------------------------------------------
class _ClientProtocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, max_frame: int) -> None:
        self._loop = loop
        self.reader = FrameReader(max_frame)
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except FrameTooLarge:
            self._fail(MLLPError("reply frame over the size limit", may_have_been_delivered=True))
            if self.transport is not None:
                self.transport.close()
            return
        waiter = self.waiter
        if frames and waiter is not None and not waiter.done():
            waiter.set_result(frames[0])  # extra or unsolicited frames are dropped

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(
            MLLPError(
                f"connection closed before the reply ({type(exc).__name__ if exc else 'EOF'})",
                may_have_been_delivered=True,
            )
        )

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)


class MLLPClient:
    """Send frames and wait for each reply; reconnects on the next send after any failure.

    MLLPTimeout (a subclass of MLLPError) means the outcome is unknown; other MLLPErrors carry
    `may_have_been_delivered` (False for connect failures: the message never left).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: _ssl.SSLContext | None = None,
        connect_timeout: float = 10,
        read_timeout: float = 30,
        server_hostname: str | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl = ssl
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.server_hostname = server_hostname
        self.max_frame = max_frame
        self._proto: _ClientProtocol | None = None
        self._lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self._proto is not None and not self._proto.closed

    async def connect(self) -> None:
        """Open the connection now (send() does it on demand)."""
        if self.connected:
            return
        self._drop()
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {}
        if self.ssl is not None:
            kwargs["ssl"] = self.ssl
            kwargs["server_hostname"] = self.server_hostname or self.host
            kwargs["ssl_handshake_timeout"] = self.connect_timeout
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: _ClientProtocol(loop, self.max_frame), self.host, self.port, **kwargs
                )
        except TimeoutError:
            raise MLLPError(f"connect to {self.host}:{self.port} timed out", may_have_been_delivered=False) from None
        except OSError as exc:
            raise MLLPError(
                f"connect to {self.host}:{self.port} failed: {type(exc).__name__}: {exc}", may_have_been_delivered=False
            ) from exc
        _tune_socket(proto.transport.get_extra_info("socket") if proto.transport else None, True)
        self._proto = proto

    async def send(self, body: bytes) -> bytes:
        """Send one frame body and return the reply body."""
        async with self._lock:
            if not self.connected:
                await self.connect()
            proto = self._proto
            assert proto is not None and proto.transport is not None
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[bytes] = loop.create_future()
            proto.waiter = waiter
            # A bare timer is cheaper than asyncio.timeout() on this per-message path.
            timer = loop.call_later(self.read_timeout, self._expire, waiter)
            try:
                proto.transport.write(b"\x0b" + body + b"\x1c\x0d")
                return await waiter
            except MLLPError:
                self._drop()  # after a timeout, a late reply would be taken for the next message's
                raise
            except (OSError, RuntimeError) as exc:
                self._drop()
                raise MLLPError(
                    f"send to {self.host}:{self.port} failed: {type(exc).__name__}", may_have_been_delivered=True
                ) from exc
            finally:
                timer.cancel()
                proto.waiter = None

    def _expire(self, waiter: asyncio.Future[bytes]) -> None:
        if not waiter.done():
            waiter.set_exception(MLLPTimeout(f"no reply from {self.host}:{self.port} within {self.read_timeout}s"))

    async def send_many(self, bodies: list[bytes]) -> list[bytes]:
        """Send bodies one after the other (MLLP allows one in flight), returning the replies."""
        return [await self.send(body) for body in bodies]

    def _drop(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.abort()
        self._proto = None

    async def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None and not proto.closed:
            proto.transport.close()
            await asyncio.sleep(0)  # let the transport release its socket

    async def __aenter__(self) -> MLLPClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# -- TLS ---------------------------------------------------------------------------------------
def server_ssl_context(
    cert: str, key: str, ca: str | None = None, require_client_cert: bool = False
) -> _ssl.SSLContext:
    """TLS 1.2+ server context; with `require_client_cert` a client needs a cert signed by `ca`."""
    ctx = _ssl.SSLContext(_ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca is not None:
        ctx.load_verify_locations(cafile=ca)
        ctx.verify_mode = _ssl.CERT_OPTIONAL
    if require_client_cert:
        if ca is None:
            raise ValueError("require_client_cert needs the CA that signs client certificates")
        ctx.verify_mode = _ssl.CERT_REQUIRED
    return ctx


def client_ssl_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> _ssl.SSLContext:
    """TLS 1.2+ client context verifying the server against `ca` (system CAs if None)."""
    ctx = _ssl.create_default_context(cafile=ca)
    ctx.minimum_version = _ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx
