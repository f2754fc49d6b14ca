"""Cluster benchmark: one engine process against two on one PostgreSQL store, with the same load.

    python benchmarks/cluster.py [--messages 2000] [--connections 8] [--pg postgresql+psycopg://postgres@127.0.0.1:5432/test]

Each phase starts fresh engine processes in cluster mode on a schema of their own (in a database
this run creates and drops), sends ORM^O01 over MLLP (the connections split over the nodes) and
forwards every message over MLLP, ordered per patient, to a receiver in this process that counts.
Printed: ACK rate (messages/s until the last ACK), drain rate (messages/s until the receiver had
them all), the ratio two/one, and for a `kill -9` of one node mid-drain the duplicates the receiver
saw and the deliveries marked re-sent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import sqlalchemy

sys.path.insert(0, str(Path(__file__).parent))
from _load import free_port, orm, run_load, wait_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class Receiver(socketserver.ThreadingTCPServer):
    """Counts every control id it is sent; ACKs after `delay` seconds."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.delay = delay
        self.got: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.port = int(self.server_address[1])
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def total(self) -> int:
        with self.lock:
            return sum(self.got.values())

    def unique(self) -> int:
        with self.lock:
            return len(self.got)


class _Handler(socketserver.BaseRequestHandler):
    server: Receiver

    def handle(self) -> None:
        buf = b""
        while chunk := _recv(self.request):
            buf += chunk
            while b"\x1c\x0d" in buf:
                frame, buf = buf.split(b"\x1c\x0d", 1)
                control_id = frame.split(b"\r", 1)[0].split(b"|")[9].decode("latin-1")
                with self.server.lock:
                    self.server.got[control_id] += 1
                if self.server.delay:
                    time.sleep(self.server.delay)
                ack = f"MSH|^~\\&|RCV|RCV|ENGINE|HOSP|20261201000000||ACK|A{control_id}|P|2.3.1\rMSA|AA|{control_id}\r"
                try:
                    self.request.sendall(b"\x0b" + ack.encode("latin-1") + b"\x1c\x0d")
                except OSError:
                    return


def _recv(sock: object) -> bytes:
    try:
        return sock.recv(65536)  # type: ignore[attr-defined]
    except OSError:
        return b""


def write_config(folder: Path) -> Path:
    (folder / "channels").mkdir(parents=True)
    (folder / "engine.yaml").write_text(
        "storage:\n  url: ${ENGINE_STORAGE_URL}\ndicom:\n  enabled: false\nhttp:\n  enabled: false\n"
        "log_level: WARNING\n"
        "cluster:\n  enabled: true\n  node_name: ${ENGINE_NODE_NAME}\n  heartbeat_seconds: 0.5\n  lease_seconds: 3\n"
    )
    (folder / "channels" / "bench.yaml").write_text(
        "name: bench\nsource: {type: mllp, port: \"${BENCH_PORT}\"}\naccept: [ORM^O01]\n"
        "destinations:\n  - {name: ris, type: mllp, host: 127.0.0.1, port: \"${RECEIVER_PORT}\", order_by: patient}\n"
    )
    return folder / "engine.yaml"


class Node:
    def __init__(self, config: Path, url: str, name: str, receiver_port: int) -> None:
        self.port = free_port()
        env = dict(os.environ, ENGINE_STORAGE_URL=url, ENGINE_NODE_NAME=name, BENCH_PORT=str(self.port),
                   RECEIVER_PORT=str(receiver_port), PYTHONPATH=str(ROOT))
        self.log = config.parent / f"{name}.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "engine", "run", "-c", str(config)], env=env,
                                         stdout=out, stderr=out)

    def wait_ready(self) -> None:
        try:
            wait_port(self.port, timeout=120)
        except RuntimeError:
            print(self.log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)


def _schema(admin: sqlalchemy.Engine, base: str) -> str:
    name = f"b_{uuid.uuid4().hex[:10]}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {name}")
    return f"{base}?options=-csearch_path%3D{name}"


def _wait(check, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def phase(config: Path, admin: sqlalchemy.Engine, base: str, count: int, n_nodes: int, conns: int,
          tag: str) -> tuple[float, float, int]:
    """(ACK rate, drain rate, AA count) with `n_nodes` nodes sharing the load."""
    rcv = Receiver()
    url = _schema(admin, base)
    nodes = [Node(config, url, f"{tag}-{i}", rcv.port) for i in range(n_nodes)]
    try:
        for n in nodes:
            n.wait_ready()
        bodies = [orm(f"{tag}-{i}", f"A{tag}{i}", patient=f"P{i % 50}") for i in range(count)]
        t0 = time.perf_counter()

        async def load() -> list:
            per = max(1, conns // n_nodes)
            return await asyncio.gather(*(run_load("127.0.0.1", n.port, bodies[i::n_nodes], per)
                                          for i, n in enumerate(nodes)))

        results = asyncio.run(load())
        acked = time.perf_counter() - t0
        _wait(lambda: rcv.unique() >= count, timeout=600)
        drained = time.perf_counter() - t0
        aa = sum(r.codes.get("AA", 0) for r in results)
        return count / acked, rcv.unique() / drained, aa
    finally:
        for n in nodes:
            n.stop()
        rcv.shutdown()
        rcv.server_close()


def kill_phase(config: Path, admin: sqlalchemy.Engine, base: str, count: int, conns: int) -> dict[str, float]:
    """Two nodes drain to a receiver taking 20 ms per ACK (slower than the senders, so a backlog
    builds); node 0 is killed when a third of the messages arrived."""
    rcv = Receiver(delay=0.02)
    url = _schema(admin, base)
    nodes = [Node(config, url, f"kill-{i}", rcv.port) for i in range(2)]
    try:
        for n in nodes:
            n.wait_ready()
        bodies = [orm(f"kill-{i}", f"AK{i}", patient=f"P{i % 50}") for i in range(count)]

        async def load() -> None:
            await asyncio.gather(*(run_load("127.0.0.1", n.port, bodies[i::2], max(1, conns // 2))
                                   for i, n in enumerate(nodes)))

        asyncio.run(load())
        _wait(lambda: rcv.unique() >= count // 3, timeout=300)
        eng = sqlalchemy.create_engine(url)
        with eng.connect() as conn:
            held = conn.exec_driver_sql(
                "SELECT count(*) FROM deliveries WHERE state = 'doing' AND claimed_by = 'kill-0'").scalar() or 0
        t_kill = time.perf_counter()
        nodes[0].stop(signal.SIGKILL)
        _wait(lambda: rcv.unique() >= count, timeout=600)
        recovered = time.perf_counter() - t_kill
        with eng.connect() as conn:
            resent = conn.exec_driver_sql("SELECT count(*) FROM deliveries WHERE resent != ''").scalar() or 0
        eng.dispose()
        return {"held": held, "duplicates": rcv.total() - rcv.unique(), "resent": resent,
                "lost": count - rcv.unique(), "seconds": recovered}
    finally:
        for n in nodes:
            n.stop()
        rcv.shutdown()
        rcv.server_close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--pg", default=os.environ.get("ENGINE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    args = ap.parse_args()
    db = f"cluster_bench_{os.getpid()}"
    server = sqlalchemy.create_engine(args.pg, isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {db}")
    base = args.pg.rsplit("/", 1)[0] + f"/{db}"
    admin = sqlalchemy.create_engine(base)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = write_config(Path(tmp))
            one = phase(config, admin, base, args.messages, 1, args.connections, "one")
            two = phase(config, admin, base, args.messages, 2, args.connections, "two")
            killed = kill_phase(config, admin, base, max(60, args.messages // 3), args.connections)
    finally:
        admin.dispose()
        with server.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        server.dispose()

    print(f"\n{args.messages} ORM^O01 per phase over {args.connections} connections; PostgreSQL, cluster mode, "
          f"every message forwarded over MLLP (ordered per patient, 50 patients); {os.cpu_count()} cores")
    print(f"{'nodes':>5} | {'ACK msg/s':>9} | {'drain msg/s':>11} | AA")
    for label, (ack, drain, aa) in (("1", one), ("2", two)):
        print(f"{label:>5} | {ack:>9.0f} | {drain:>11.0f} | {aa}")
    print(f"ratio two/one: ACK {two[0] / one[0]:.2f}, drain {two[1] / one[1]:.2f}")
    print(f"kill -9 of one of two nodes mid-drain of {max(60, args.messages // 3)} messages "
          f"(it held {killed['held']:.0f} claims): "
          f"{killed['duplicates']:.0f} duplicates at the receiver, {killed['resent']:.0f} deliveries marked re-sent, "
          f"{killed['lost']:.0f} lost; the rest drained {killed['seconds']:.1f} s after the kill")


if __name__ == "__main__":
    main()
