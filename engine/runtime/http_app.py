"""The one HTTP listener: FastAPI on uvicorn, run inside the engine's event loop.

Every `http` source registers its channel here; the generic write routes
(`POST /fhir/<channel>`, `POST /fhir/<channel>/<Type>`, `PUT /fhir/<channel>/<Type>/<id>`) hand
the body to that channel's pipeline and answer only after commit, with the adapter's stored
answer. Destinations may contribute read routes (`http_router(db, channel)`, contract C6): the
router's paths are whole paths (`/fhir/<channel>/List`), included without a prefix and before the
generic routes, behind the same bearer-token check (and audited like any request).
`GET /health` is open (no data, for load balancers); everything else, `/metrics` included, needs
the token when one is configured.
Each request is audited (engine.store.audit) by a background writer: who, what, when, outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import pydantic_core
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import DATA_TYPE_ERROR, UNSUPPORTED_MESSAGE_TYPE
from engine.fhir.adapter import FHIRInputError, operation_outcome, read_answer
from engine.runtime import metrics
from engine.runtime.config import HttpConfig
from engine.runtime.sources.base import Endpoint, Receiver
from engine.store.audit import AuditRow, AuditWriter
from engine.store.db import make_read_engine
from engine.store.models import MessageStatus, utcnow

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json; charset=utf-8"
MEDIA_TYPES = frozenset({"application/fhir+json", "application/json"})
OPEN_PATHS = frozenset({"/health"})
METRICS_TTL = 2.0  # seconds a /metrics answer is reused
DRAIN_BYTES = 32 * 2**20  # a refused body up to this size is read and dropped; past it the connection closes

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class BodyTooLarge(Exception):
    """args[0]: whether the rest of the body was read (the connection may stay open)."""


def _fhir(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(pydantic_core.to_json(body), status, headers=headers, media_type=FHIR_JSON)  # UTF-8, compact


def _refuse(status: int, issue: str, text: str, headers: dict[str, str] | None = None) -> Response:
    return _fhir(status, operation_outcome(issue, text), headers)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the engine owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpApp:
    def __init__(self, config: HttpConfig, db: Engine) -> None:
        self.config = config
        self.db = db
        self.channels: dict[str, tuple[Receiver, int]] = {}  # name -> (pipeline, body limit)
        self.routers: list[APIRouter] = []
        self.requests: Counter[tuple[str, int]] = Counter()  # (channel, status) -> count, for /metrics
        self.audit = AuditWriter(db) if config.audit else None
        token = config.token.encode()
        self._token = token
        self._identity = "token:" + hashlib.sha256(token).hexdigest()[:12] if token else "anonymous"
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._scraped: tuple[float, str] | None = None  # (loop time, text) of the last scrape

    # -- what sources and destinations register ----------------------------------------------
    def add_channel(self, name: str, receiver: Receiver, max_body_bytes: int | None = None) -> None:
        self.channels[name] = (receiver, max_body_bytes or self.config.max_body_bytes)

    def remove_channel(self, name: str) -> None:
        self.channels.pop(name, None)

    def include(self, router: APIRouter) -> None:
        if self._server is not None:
            raise RuntimeError("routers must be included before the HTTP listener starts")
        self.routers.append(router)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1]) if self._sock is not None else self.config.port

    def endpoint(self) -> Endpoint:
        return Endpoint("http", self.config.host, self.port)

    # -- lifecycle ---------------------------------------------------------------------------
    def build(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        app.add_exception_handler(StarletteHTTPException, _http_error)  # FHIR clients read OperationOutcomes
        app.add_exception_handler(RequestValidationError, _request_error)
        for router in self.routers:  # C6: before the generic write routes
            app.include_router(router)
        app.add_api_route("/health", self._health, methods=["GET"])
        app.add_api_route("/metrics", self._metrics, methods=["GET"])
        app.add_api_route("/fhir/{channel}", self._post, methods=["POST"])
        app.add_api_route("/fhir/{channel}/{rtype}", self._post_type, methods=["POST"])
        app.add_api_route("/fhir/{channel}/{rtype}/{rid}", self._put, methods=["PUT"])
        return app

    async def start(self) -> None:
        cfg = self.config
        family, kind, proto, _, addr = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"the HTTP listener cannot bind {cfg.host}:{cfg.port} ({exc.strerror}); "
                                     "set HTTP_PORT to a free port") from None
        self._sock = sock
        if self.audit is not None:
            self.audit.start()
        ucfg = uvicorn.Config(self._guard(self.build()), log_config=None, log_level="warning", access_log=False,
                              lifespan="off", server_header=False, timeout_keep_alive=30,
                              limit_concurrency=cfg.max_connections)
        self._server = _EmbeddedServer(ucfg)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-listener")
        deadline = asyncio.get_running_loop().time() + 30
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP listener stopped while starting")
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError("the HTTP listener did not start within 30 s")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True  # in-flight requests finish; their units are committed
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 30)
            except TimeoutError:
                self._server.force_exit = True
                await self._task
            self._server = None
            self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.audit is not None:
            await asyncio.to_thread(self.audit.stop)

    # -- access and audit, around every request ----------------------------------------------
    def _guard(self, app: ASGIApp) -> ASGIApp:
        token, identity = self._token, self._identity

        async def guarded(scope: Scope, receive: Callable[[], Awaitable[Any]],
                          send: Callable[[Any], Awaitable[None]]) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            state = scope.setdefault("state", {})
            status = 0

            async def sending(message: Any) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            who = "anonymous"
            try:
                if token and scope["path"] not in OPEN_PATHS:
                    if not _bearer_ok(scope, token):
                        resp = _refuse(401, "login", "a valid bearer token is required",
                                       {"WWW-Authenticate": 'Bearer realm="engine"'})
                        await resp(scope, receive, sending)
                        return
                    who = identity
                await app(scope, receive, sending)
            finally:
                self._account(scope, state, who, status)

        return guarded

    def _account(self, scope: Scope, state: dict[str, Any], who: str, status: int) -> None:
        channel = str(state.get("channel", ""))
        self.requests[(channel, status)] += 1
        if self.audit is None or scope["path"] in OPEN_PATHS:
            return
        client = scope.get("client")
        self.audit.add(AuditRow(utcnow(), f"{client[0]}:{client[1]}" if client else "", who, scope["method"],
                                scope["path"], channel, status, state.get("message_id")))

    # -- routes ------------------------------------------------------------------------------
    async def _health(self) -> Response:
        return JSONResponse({"status": "ok", "channels": sorted(self.channels)})

    async def _metrics(self) -> Response:
        """Counted in the store at most every METRICS_TTL seconds: a scrape scans the messages table,
        and several scrapers (or a reload loop) must not make the store do it back to back."""
        now = asyncio.get_running_loop().time()
        if self._scraped is None or now - self._scraped[0] >= METRICS_TTL:
            text = await asyncio.to_thread(metrics.render, make_read_engine(self.db), Counter(self.requests))
            self._scraped = (now, text)
        return PlainTextResponse(self._scraped[1], media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _post(self, channel: str, request: Request) -> Response:
        return await self._write(request, channel, None, None)

    async def _post_type(self, channel: str, rtype: str, request: Request) -> Response:
        return await self._write(request, channel, rtype, None)

    async def _put(self, channel: str, rtype: str, rid: str, request: Request) -> Response:
        return await self._write(request, channel, rtype, rid)

    async def _write(self, request: Request, channel: str, rtype: str | None, rid: str | None) -> Response:
        try:
            return await self._write_unit(request, channel, rtype, rid)
        except Exception as exc:  # the store failed: its error text can quote the body (PHI), so the type only
            log.error("channel %s: HTTP unit not stored: %s", channel, type(exc).__name__)
            return _refuse(503, "transient", "the engine could not store the request; nothing was kept, send it again",
                           {"Retry-After": "5"})

    async def _write_unit(self, request: Request, channel: str, rtype: str | None, rid: str | None) -> Response:
        found = self.channels.get(channel)
        if found is None:
            return _refuse(404, "not-found", f"no channel {channel!r} takes FHIR here")
        request.state.channel = channel
        receiver, limit = found
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media not in MEDIA_TYPES:
            return _refuse(415, "not-supported", "send application/fhir+json (or application/json)")
        try:
            raw = await asyncio.wait_for(_read_body(request, limit), self.config.read_timeout)
        except TimeoutError:
            return _refuse(408, "timeout", f"the body did not arrive within {self.config.read_timeout:g} s",
                           {"Connection": "close"})
        except BodyTooLarge as exc:
            close = {} if exc.args[0] else {"Connection": "close"}
            return _refuse(413, "too-long", f"the body is larger than {limit} bytes", close)
        refusal = _path_mismatch(raw, rtype, rid) if rtype is not None else None
        adapter = receiver.adapter
        parts = None if refusal is not None else adapter.split(raw)
        if parts is None:
            outcome = await receiver.receive(raw, refusal=refusal)  # a mismatch is stored too, as an error
            request.state.message_id = outcome.message_id
            answer = read_answer(outcome.answer)
            headers: dict[str, str] = {}
            if outcome.status == MessageStatus.DUPLICATE and outcome.duplicate_of is not None:
                headers["X-Duplicate-Of"] = str(outcome.duplicate_of)
            if answer.location:
                headers["Location"] = f"/fhir/{channel}/{answer.location}"
            if answer.body is None:  # success: the resource as received, which is what was stored
                return Response(raw, answer.status, headers=headers, media_type=FHIR_JSON)
            return _fhir(answer.status, answer.body, headers)
        outcomes = list(await asyncio.gather(*(receiver.receive(p) for p in parts)))
        if outcomes:
            request.state.message_id = outcomes[0].message_id
        answer = read_answer(adapter.combine(outcomes))
        return _fhir(answer.status, answer.body or {})


ISSUES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
          409: "conflict", 413: "too-long", 415: "not-supported", 422: "processing"}


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    issue = ISSUES.get(exc.status_code, "exception")
    return _refuse(exc.status_code, issue, str(exc.detail), dict(exc.headers or {}))


async def _request_error(_request: Request, exc: Exception) -> Response:
    """A read route's query or path parameter that does not validate: named, without its value."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return _fhir(400, operation_outcome("invalid", f"{where}: {first.get('msg', 'invalid')}", where))


def _bearer_ok(scope: Scope, token: bytes) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, given = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)
    return False


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit` (by Content-Length, or while it arrives).
    The rest of a refused body is read and dropped (up to DRAIN_BYTES), so a client that sends the
    whole request before reading gets its 413 instead of a broken connection."""
    declared = request.headers.get("content-length")
    size = int(declared) if declared and declared.isdigit() else 0
    if size > DRAIN_BYTES:
        raise BodyTooLarge(False)
    chunks: list[bytes] = []
    stream = request.stream()
    async for chunk in stream:
        size = size if declared else size + len(chunk)
        if size > limit:
            break
        chunks.append(chunk)
    else:
        return b"".join(chunks)
    chunks.clear()
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > DRAIN_BYTES:
            raise BodyTooLarge(False)
    raise BodyTooLarge(True)


def _path_mismatch(raw: bytes, rtype: str, rid: str | None) -> FHIRInputError | None:
    """`POST /Type` and `PUT /Type/id` must name what the body holds (a body that is not JSON is
    left to the adapter, which stores and refuses it)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    if body.get("resourceType") != rtype:
        text = f"the URL names {rtype} but the body is a {body.get('resourceType') or 'resource without a type'}"
        return FHIRInputError(text, UNSUPPORTED_MESSAGE_TYPE, "resourceType", http=400, issue="invalid")
    if rid is not None and body.get("id") != rid:
        return FHIRInputError("the id in the URL and the resource's id differ", DATA_TYPE_ERROR, f"{rtype}.id",
                              http=400, issue="invalid")
    return None
    if not isinstance(body, dict):
        return ""
    if body.get("resourceType") != rtype:
        return f"the URL names {rtype} but the body is a {body.get('resourceType') or 'resource without a type'}"
    if rid is not None and body.get("id") != rid:
        return "the id in the URL and the resource's id differ"
    return ""
