"""Two real `engine run` processes on one PostgreSQL database, and the peers they talk to.

Every test gets a schema of its own in a database made for this test session (other test runs
use the `test` database at the same time). Nodes run the shipped ris-orders channel (worklist,
archive folder shared by both nodes) and a `forward` channel that passes ORMs on over MLLP, ordered
per patient, to a receiver of the test's own that counts what it gets.
"""

from __future__ import annotations

import os
import re
import signal
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy

from tests.conftest import PG_URL, free_port, postgres_reachable

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.postgres

HEARTBEAT = 0.5
LEASE = 3.0


@pytest.fixture(scope="session")
def cluster_database() -> Iterator[str]:
    """A database of this session's own, dropped at the end."""
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (user postgres)")
    name = f"cluster_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    url = PG_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@pytest.fixture
def store_url(cluster_database: str) -> Iterator[str]:
    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(cluster_database)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    yield f"{cluster_database}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    admin.dispose()


@pytest.fixture
def store(store_url: str) -> Iterator[sqlalchemy.Engine]:
    """The test's view of the nodes' database (after the first node made the tables)."""
    eng = sqlalchemy.create_engine(store_url)
    yield eng
    eng.dispose()


# -- a receiver that counts -----------------------------------------------------------------------
@dataclass
class Received:
    control_id: str
    patient: str
    at: float


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.request.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\x1c\x0d" in buf:
                frame, buf = buf.split(b"\x1c\x0d", 1)
                text = frame.split(b"\x0b", 1)[-1].decode("latin-1")
                segments = {s.split("|", 1)[0]: s.split("|") for s in text.split("\r") if s}
                control_id = segments["MSH"][9]
                patient = segments.get("PID", [""] * 4)[3].split("^")[0]
                self.server.owner.record(Received(control_id, patient, time.monotonic()))
                time.sleep(self.server.owner.delay)
                ack = (f"MSH|^~\\&|RCV|RCV|ENGINE|HOSP|20261201000000||ACK^O01|A{control_id}|P|2.3.1\r"
                       f"MSA|AA|{control_id}\r")
                try:
                    self.request.sendall(b"\x0b" + ack.encode("latin-1") + b"\x1c\x0d")
                except OSError:
                    return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: CountingReceiver


@dataclass
class CountingReceiver:
    """An MLLP listener that takes `delay` seconds per ACK and records every frame it gets."""

    delay: float = 0.0
    port: int = 0
    got: list[Received] = field(default_factory=list)
    _server: _Server | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> CountingReceiver:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.owner = self
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="counting-receiver", daemon=True)
        self._thread.start()
        return self

    def record(self, r: Received) -> None:
        with self._lock:
            self.got.append(r)

    def control_ids(self) -> list[str]:
        with self._lock:
            return [r.control_id for r in self.got]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)


@pytest.fixture
def receiver() -> Iterator[Callable[[float], CountingReceiver]]:
    made: list[CountingReceiver] = []

    def make(delay: float = 0.0) -> CountingReceiver:
        r = CountingReceiver(delay).start()
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


# -- engine nodes -----------------------------------------------------------------------------------
FORWARD_CHANNEL = """\
name: forward
source: {type: mllp, port: "${FORWARD_MLLP_PORT}"}
accept: [ORM^O01]
destinations:
  - {name: ris, type: mllp, host: 127.0.0.1, port: "${RECEIVER_PORT:-1}", order_by: patient, ack_timeout: 60}
"""


def write_config(folder: Path, *, purge_minutes: float = 15.0) -> Path:
    """The shipped engine.yaml with short heartbeat and lease, the shipped ris-orders channel and `forward`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "channels").mkdir(exist_ok=True)
    text = (ROOT / "engine.yaml").read_text()
    text = text.replace("channels_dir: channels", f"channels_dir: {folder / 'channels'}")
    if not (folder / "mappings").exists():  # destinations name mapping files relative to the config
        (folder / "mappings").symlink_to(ROOT / "mappings")
    text = re.sub(r"heartbeat_seconds: \S+", f"heartbeat_seconds: {HEARTBEAT}", text)
    text = re.sub(r"lease_seconds: \S+", f"lease_seconds: {LEASE}", text)
    text = re.sub(r"purge_interval_minutes: \S+", f"purge_interval_minutes: {purge_minutes}", text)
    (folder / "engine.yaml").write_text(text)
    (folder / "channels" / "ris-orders.yaml").write_text((ROOT / "channels" / "ris-orders.yaml").read_text())
    (folder / "channels" / "forward.yaml").write_text(FORWARD_CHANNEL)
    return folder / "engine.yaml"


class Node:
    """`engine run` in a subprocess on its own ports; the archive folder is shared by all nodes."""

    def __init__(self, tmp_path: Path, name: str, storage_url: str, *, cluster: bool = True,
                 receiver_port: int = 1, purge_minutes: float = 15.0) -> None:
        self.name = name
        self.config = write_config(tmp_path / f"conf-{name}", purge_minutes=purge_minutes)
        self.orders_port, self.forward_port, self.dicom_port = free_port(), free_port(), free_port()
        self.env = dict(os.environ)
        self.env.update({
            "PYTHONPATH": str(ROOT),
            "ENGINE_STORAGE_URL": storage_url,
            "ENGINE_CLUSTER": "true" if cluster else "false",
            "ENGINE_NODE_NAME": name,
            "ENGINE_LOG_LEVEL": "INFO",
            "ORDERS_MLLP_PORT": str(self.orders_port),
            "FORWARD_MLLP_PORT": str(self.forward_port),
            "RECEIVER_PORT": str(receiver_port),
            "DICOM_PORT": str(self.dicom_port),
            "HTTP_PORT": str(free_port()),
            "ORDERS_ARCHIVE_DIR": str(tmp_path / "archive"),
        })
        self.log = tmp_path / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:  # a file, not a pipe: a full pipe would stall the engine
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine", "run", "-c", str(self.config)], env=self.env, stdout=out, stderr=out
            )
        return self.proc

    def start(self) -> Node:
        proc = self.spawn()
        deadline = time.time() + 90
        import socket

        while time.time() < deadline:
            try:
                for port in (self.forward_port, self.orders_port, self.dicom_port):  # the DICOM SCP starts last
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return self
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(self.log.read_text(errors="replace")) from None
                time.sleep(0.1)
        raise RuntimeError(f"node {self.name} did not start")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "engine", *args, "-c", str(self.config)], env=self.env,
                              capture_output=True, text=True, timeout=120, cwd=ROOT)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def nodes(tmp_path: Path, store_url: str) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(name: str, **kw: object) -> Node:
        node = Node(tmp_path, name, kw.pop("storage_url", store_url), **kw)  # type: ignore[arg-type]
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


# -- messages ---------------------------------------------------------------------------------------
def orm(control_id: str, accession: str, patient: str = "PAT001", control: str = "NW") -> bytes:
    """An ORM^O01 the shipped orders mapping takes: one order, one step, numbers from the accession."""
    segments = [
        f"MSH|^~\\&|RIS|HOSP|ENGINE|HOSP|20261201093000||ORM^O01|{control_id}|P|2.3.1",
        f"PID|1||{patient}^^^HOSP^MR||DOE^JANE^Q||19700101|F",
        "PV1|1|O|RAD^101^1",
        f"ORC|{control}|P{accession}|F{accession}||SC||^^^20261202100000^^R||20261201093000",
        f"OBR|1|P{accession}|F{accession}|CTHEAD^CT HEAD^L|||20261201093000|||||||||1234^ORDERING^OSCAR||{accession}|"
        f"RP{accession}|SPS{accession}||||CT|||^^^20261202100000^^R",
    ]
    return "\r".join(segments).encode("latin-1") + b"\r"


def wait_for(check: Callable[[], bool], timeout: float = 90.0, every: float = 0.2) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        time.sleep(every)
    return check()
