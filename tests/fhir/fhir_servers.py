"""A real FHIR server (sekmet) started per test module, and a fault-injecting HTTP proxy.

sekmet (PyPI `sekmet-fhir`: FastAPI over SQLite, conditional update, transactions, If-None-Exist)
plays the EMR. The proxy sits in front of it and, per request, either forwards or does what a
server does on a bad day: 503 with Retry-After, a stall past the client's timeout, a connection
reset, 400 with an OperationOutcome.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from engine.hl7.mllp import MLLPClient
from engine.store.models import Delivery

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-" + uuid.uuid4().hex  # the bearer token sekmet_with_auth accepts
PASSWORD = "test-password-" + uuid.uuid4().hex  # user "engine"'s password on sekmet_with_basic


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sekmet:
    """`sekmet serve` in a subprocess on a free port, with its own database."""

    def __init__(self, folder: Path, *, tokens: list[str] | None = None, users: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/fhir"
        self.tokens = tokens or []
        self.users = users or {}  # HTTP Basic: username -> password
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        auth: dict[str, Any] = {"types": ["none"]}
        if self.tokens:
            auth = {"types": ["bearer"], "tokens": self.tokens}
        elif self.users:
            auth = {"types": ["basic"], "users": self.users}
        settings = {
            "base_url": self.base_url,
            "host": "127.0.0.1",
            "port": self.port,
            "data_dir": str(self.folder),
            "db_path": str(self.folder / "sekmet.db"),
            "server_auth": auth,
            "simulator": {"enabled": False},
            "log_inbound": False,
            "validation": {"inbound": "strict"},
        }
        cfg = self.folder / "settings.yaml"
        cfg.write_text(json.dumps(settings))  # JSON is YAML
        env = dict(os.environ, SEKMET_CONFIG=str(cfg), SEKMET_BASE_URL=self.base_url)
        sekmet = Path(sys.executable).with_name("sekmet")
        cmd = [str(sekmet)] if sekmet.exists() else [sys.executable, "-m", "sekmet.cli"]
        with open(self.folder / "sekmet.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [*cmd, "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env, stdout=log, stderr=log, cwd=self.folder,
            )
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.folder / "sekmet.log").read_text(errors="replace"))
            try:
                if httpx.get(f"{self.base_url}/metadata", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("sekmet did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def headers(self) -> dict[str, str]:
        if self.users:
            user, password = next(iter(self.users.items()))
            raw = base64.b64encode(f"{user}:{password}".encode()).decode()
            return {"Authorization": f"Basic {raw}"}
        return {"Authorization": f"Bearer {self.tokens[0]}"} if self.tokens else {}

    def search(self, rtype: str, **params: str) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.base_url}/{rtype}", params={**params, "_count": "1000"}, headers=self.headers(),
                         timeout=30)
        resp.raise_for_status()
        return [e["resource"] for e in resp.json().get("entry", []) if e.get("search", {}).get("mode") != "include"]

    def history(self, rtype: str, rid: str) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.base_url}/{rtype}/{rid}/_history", headers=self.headers(), timeout=30)
        resp.raise_for_status()
        return [e.get("resource", {}) for e in resp.json().get("entry", [])]


@dataclass
class FaultProxy:
    """HTTP/1.1 proxy in front of `upstream`; `faults` is consumed one per request.

    Faults: "503" (with Retry-After: 1), "stall" (answer nothing for `stall_seconds`), "reset"
    (close the connection mid-response), "400" or "412" (an OperationOutcome), None: forward.
    `fault_when(method, path)`, when set, is asked first and may name a fault for that request.
    """

    upstream: str  # http://127.0.0.1:N
    faults: list[str | None] = field(default_factory=list)
    fault_when: Callable[[str, str], str | None] | None = None
    stall_seconds: float = 5.0
    port: int = 0
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, fault)
    _server: asyncio.base_events.Server | None = None
    _client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(base_url=self.upstream, timeout=60)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        if self._client is not None:
            await self._client.aclose()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                fault = self.fault_when(method, path) if self.fault_when is not None else None
                if fault is None:
                    fault = self.faults.pop(0) if self.faults else None
                self.requests.append((method, path, fault))
                if fault == "stall":
                    await asyncio.sleep(self.stall_seconds)
                    return
                if fault == "reset":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"resourceType\":")
                    await writer.drain()
                    sock = writer.get_extra_info("socket")
                    if sock is not None:  # RST, not FIN
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    writer.transport.abort()
                    return
                if fault == "503":
                    await self._answer(writer, 503, {"resourceType": "OperationOutcome", "issue": [
                        {"severity": "error", "code": "transient", "diagnostics": "maintenance"}]},
                        {"Retry-After": "1"})
                    continue
                if fault == "400":
                    await self._answer(writer, 400, {"resourceType": "OperationOutcome", "issue": [
                        {"severity": "error", "code": "invalid", "diagnostics": "rejected by the proxy"}]})
                    continue
                if fault == "412":
                    await self._answer(writer, 412, {"resourceType": "OperationOutcome", "issue": [
                        {"severity": "error", "code": "multiple-matches",
                         "diagnostics": "conditional update matched 2 resources"}]})
                    continue
                assert self._client is not None
                fwd = {k: v for k, v in headers.items() if k not in ("host", "content-length", "connection")}
                resp = await self._client.request(method, path, content=body, headers=fwd)
                await self._answer_raw(writer, resp.status_code, resp.content, resp.headers.get("content-type", ""),
                                       {k: v for k, v in resp.headers.items() if k.lower() in ("etag", "location")})
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, status: int, body: dict[str, Any],
                      extra: dict[str, str] | None = None) -> None:
        await self._answer_raw(writer, status, json.dumps(body).encode(), "application/fhir+json", extra or {})

    async def _answer_raw(self, writer: asyncio.StreamWriter, status: int, content: bytes, ctype: str,
                          extra: dict[str, str]) -> None:
        head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(content)}"]
        if ctype:
            head.append(f"Content-Type: {ctype}")
        head += [f"{k}: {v}" for k, v in extra.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + content)
        await writer.drain()


# -- helpers for the tests and the benchmark ---------------------------------------------------
async def send(app: Any, *messages: bytes) -> list[bytes]:
    client = MLLPClient("127.0.0.1", app.port_of("ris-results"), connect_timeout=5, read_timeout=30)
    try:
        return [await client.send(m) for m in messages]
    finally:
        await client.close()


def deliveries(app: Any, destination: str = "emr") -> list[Any]:
    t = Delivery.__table__  # type: ignore[attr-defined]
    with app.db.connect() as conn:
        rows = conn.execute(select(t).where(t.c.destination == destination).order_by(t.c.id)).all()
    return list(rows)


async def settled(app: Any, count: int, *, timeout: float = 60, destination: str = "emr") -> list[Any]:
    """Wait until `count` deliveries exist and none is pending or in flight."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        rows = await asyncio.to_thread(deliveries, app, destination)
        if len(rows) >= count and all(r.state in ("done", "dead") for r in rows):
            return rows
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"deliveries not settled: {[(r.id, r.state, r.last_error) for r in rows]}")
        await asyncio.sleep(0.1)


def oru(
    control_id: str,
    *,
    filler: str,
    mrn: str = "100234",
    accession: str = "",
    placer: str = "",
    status: str = "F",
    issued: str = "20261125115500",
    msh7: str = "20261125120000",
    text: list[str] | None = None,
    values: list[tuple[str, str, str, str]] | None = None,
    extra: list[str] | None = None,
) -> bytes:
    """An ORU^R01 with report text lines (TX) and coded/numeric OBX (type, OBX-3, OBX-4, OBX-5)."""
    lines = text if text is not None else ["CT head without contrast:", "", "No acute abnormality.",
                                           "IMPRESSION:", "Normal study."]
    segs = [
        f"MSH|^~\\&|RIS|RADIOLOGY|ENGINE|HOSPITAL|{msh7}||ORU^R01^ORU_R01|{control_id}|P|2.5.1",
        f"PID|1||{mrn}^^^HOSP^MR||Doe^Jane||19800512|F",
        f"ORC|RE|{placer}^RIS|{filler}^PACS||CM",
        f"OBR|1|{placer}^RIS|{filler}^PACS|CTHEAD^CT Head^LOCAL|||20261125100500|20261125101500||||||||||"
        f"{accession}||||{issued}||CT|{status}|||||||5001&Grey&Meredith&&&Dr",
    ]
    n = 0
    for line in lines:
        n += 1
        segs.append(f"OBX|{n}|TX|REPORT^Report text^LOCAL|1|{line}||||||{status}")
    for vtype, code, sub, value in values or []:
        n += 1
        unit = "mm^mm^UCUM" if vtype == "NM" else ""
        segs.append(f"OBX|{n}|{vtype}|{code}^{code}^LOCAL|{sub}|{value}|{unit}|||||{status}")
    segs += extra or []
    return ("\r".join(segs) + "\r").encode()


def uid() -> str:
    return uuid.uuid4().hex[:10].upper()


@dataclass
class TokenServer:
    """An OAuth2 token endpoint (client credentials, HTTP Basic client auth) over a real socket."""

    client_id: str
    client_secret: str
    token: str
    expires_in: int = 3600
    port: int = 0
    requests: int = 0
    _server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in head.split("\r\n")[1:] if ":" in line)}
                body = (await reader.readexactly(int(headers.get("content-length", "0") or 0))).decode()
                self.requests += 1
                expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
                if headers.get("authorization") != f"Basic {expected}" or "grant_type=client_credentials" not in body:
                    status, answer = 401, {"error": "invalid_client"}
                else:
                    status, answer = 200, {"access_token": self.token, "token_type": "Bearer",
                                           "expires_in": self.expires_in}
                data = json.dumps(answer).encode()
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
