"""Ingest benchmark: ORM^O01 over MLLP into the engine (durable: stored, fsynced, then ACKed)
against a bare asyncio frame-and-ACK loop, in the same run, over 1, 8 and 32 connections.

    python benchmarks/ingest.py [--messages 20000] [--destination none|file]

Prints messages/s, p50 and p99 ACK latency for both, the ratio engine/bare, and the engine's
resident memory after each phase (it should stay flat).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _load import free_port, orm, rss_mb, run_load, wait_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def write_config(folder: Path, port: int, destination: str) -> Path:
    (folder / "channels").mkdir()
    (folder / "mappings").mkdir()
    (folder / "engine.yaml").write_text(
        "storage:\n  url: ${ENGINE_STORAGE_URL:-}\ndicom:\n  enabled: false\nlog_level: WARNING\n"
    )
    dest = ""
    if destination == "file":
        dest = f"destinations:\n  - name: out\n    type: file\n    directory: {folder / 'out'}\n"
    (folder / "channels" / "bench.yaml").write_text(
        f"name: bench-orders\nsource:\n  type: mllp\n  port: {port}\naccept: [ORM^O01]\n{dest}"
    )
    return folder / "engine.yaml"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--connections", default="1,8,32")
    ap.add_argument("--destination", choices=["none", "file"], default="none")
    args = ap.parse_args()
    conns = [int(c) for c in args.connections.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        eport, bport = free_port(), free_port()
        config = write_config(folder, eport, args.destination)
        env = dict(os.environ)
        env.pop("ENGINE_STORAGE_URL", None)
        engine = subprocess.Popen([sys.executable, "-m", "engine", "run", "-c", str(config)], env=env,
                                  stdout=subprocess.DEVNULL)
        bare = subprocess.Popen([sys.executable, str(Path(__file__).parent / "bare_mllp.py"), str(bport)],
                                stdout=subprocess.DEVNULL)
        try:
            wait_port(eport)
            wait_port(bport)
            rows = []
            for n in conns:
                tag = f"{n}c{int(time.time())}"
                bodies = [orm(f"{tag}-{i}", f"A{tag}{i}") for i in range(args.messages)]
                b = asyncio.run(run_load("127.0.0.1", bport, bodies, n))
                e = asyncio.run(run_load("127.0.0.1", eport, bodies, n))
                rss, hwm = rss_mb(engine.pid)
                rows.append((n, e, b, rss, hwm))
                bad = {k: v for k, v in e.codes.items() if k != "AA"}
                if bad:
                    print(f"  warning: engine answered {bad} at {n} connections")
            print(f"\n{args.messages} ORM^O01 per run; engine: SQLite WAL, synchronous=FULL, "
                  f"destination={args.destination}")
            print(f"{'conns':>5} | {'engine msg/s':>12} {'p50 ms':>7} {'p99 ms':>7} | {'bare msg/s':>10} "
                  f"{'p50 ms':>7} {'p99 ms':>7} | {'ratio':>5} | engine RSS MB (peak)")
            for n, e, b, rss, hwm in rows:
                print(f"{n:>5} | {e.rate:>12.0f} {e.p50:>7.2f} {e.pct(0.99):>7.2f} | {b.rate:>10.0f} "
                      f"{b.p50:>7.2f} {b.pct(0.99):>7.2f} | {e.rate / b.rate:>5.2f} | {rss:.0f} ({hwm:.0f})")
        finally:
            for p in (engine, bare):
                p.terminate()
                p.wait(timeout=30)


if __name__ == "__main__":
    main()
