"""Results benchmark: ORU^R01 over MLLP -> validated DiagnosticReport queued and ACKed, then
delivered to a real FHIR server (sekmet).

    python benchmarks/fhir_results.py [--reports 3000] [--connections 8] [--patients 200]
                                      [--bridge /path/to/hl7v2-fhir-bridge]

1. Ingest: the engine runs as a subprocess (`python -m engine run`) on a temporary copy of the
   shipped configuration (ris-results with its FHIR destination only; the raw outbox is left
   out), its EMR a listening socket that never answers, so nothing is delivered while the
   senders run. N unique ORU^R01 (report text, a numeric and a coded OBX) go over 8 connections,
   one message in flight each: reports/s and p50/p99 ACK latency. Every AA means the report was
   mapped, built, validated (fhir.resources R4B) and queued durably.
   Baseline in the same run, where it is installed (`pip install --target DIR --no-deps
   hl7v2-fhir-bridge`, pass DIR with --bridge): that converter's parse + convert + validate of
   the same messages to a transaction Bundle, in one process, nothing durable.
2. Delivery: the engine is restarted with sekmet as its EMR and drains the queue (8 parallel
   requests; with the shipped stale-report check each report costs a search and a transaction).
   Baseline: the same transaction Bundles (built by the engine's own writer from the queued
   plans) POSTed straight to a second, fresh sekmet with 8 parallel requests.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _load import LoadResult, free_port, run_load, wait_port  # noqa: E402


def _servers() -> ModuleType:
    """tests/fhir/fhir_servers.py: the sekmet launcher and the ORU builder the tests use."""
    spec = importlib.util.spec_from_file_location("fhir_servers", ROOT / "tests" / "fhir" / "fhir_servers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fhir_servers"] = module
    spec.loader.exec_module(module)
    return module


def copy_config(folder: Path) -> Path:
    shutil.copy2(ROOT / "engine.yaml", folder / "engine.yaml")
    (folder / "channels").mkdir()
    channel = (ROOT / "channels" / "ris-results.yaml").read_text()
    head, sep, _ = channel.partition("  - name: outbox\n")
    if not sep:
        raise SystemExit("channels/ris-results.yaml has no `outbox` destination to leave out")
    (folder / "channels" / "ris-results.yaml").write_text(head)
    shutil.copytree(ROOT / "mappings", folder / "mappings")
    text = (folder / "engine.yaml").read_text().replace("  enabled: true\n", "  enabled: false\n", 1)  # no DICOM SCP
    (folder / "engine.yaml").write_text(text)
    return folder / "engine.yaml"


def engine_env(folder: Path, port: int, emr: str, timeout: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "ENGINE_STORAGE_URL": f"sqlite:///{folder / 'engine.db'}",
        "RESULTS_MLLP_PORT": str(port),
        "HTTP_PORT": "0",  # the shared HTTP listener on any free port
        "ENGINE_LOG_LEVEL": "WARNING",
        "BIND_HOST": "127.0.0.1",
        "EMR_FHIR_BASE": emr,
        "EMR_FHIR_AUTH": "none",
        "EMR_FHIR_TIMEOUT": timeout,
    })
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def start_engine(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "engine", "run", "-c", str(config)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def states(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return dict(conn.execute("SELECT state, count(*) FROM deliveries GROUP BY state").fetchall())
    finally:
        conn.close()


def bridge_rate(path: str, bodies: list[bytes]) -> float | None:
    """hl7v2-fhir-bridge: parse + convert + validate each message, one process; None when absent."""
    if not path:
        return None
    sys.path.insert(0, path)
    try:
        from v2fhir.config import load_config
        from v2fhir.convert import convert
        from v2fhir.hl7.parser import parse_bytes
        from v2fhir.validate import validate_bundle
    except ImportError as exc:
        print(f"hl7v2-fhir-bridge not importable from {path}: {exc}")
        return None
    cfg = load_config()
    for raw in bodies[:50]:  # warm-up
        validate_bundle(convert(parse_bytes(raw), cfg).bundle)
    t0 = time.perf_counter()
    for raw in bodies:
        validate_bundle(convert(parse_bytes(raw), cfg).bundle)
    return len(bodies) / (time.perf_counter() - t0)


async def direct_rate(base_url: str, plans: list[dict[str, Any]], parallel: int) -> float:
    """The same transaction Bundles the engine sends, POSTed straight to the server."""
    import httpx

    from engine.fhir.client import Auth, AuthConfig
    from engine.fhir.resources import Plan
    from engine.fhir.writer import FhirWriter

    sem = asyncio.Semaphore(parallel)
    failures = 0
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=parallel)) as client:
        writer = FhirWriter(client, base_url, Auth(AuthConfig()), mode="transaction", guard_stale=False)

        async def one(p: dict[str, Any]) -> None:
            nonlocal failures
            async with sem:
                result = await writer.write(Plan.from_json(p))
                failures += 0 if result.ok else 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in plans))
        seconds = time.perf_counter() - t0
    if failures:
        print(f"direct: {failures} of {len(plans)} transactions failed")
    return len(plans) / seconds


def row(name: str, r: LoadResult) -> str:
    return f"| {name} | {r.rate:,.0f} | {r.p50:.2f} / {r.pct(0.99):.2f} | {r.codes} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reports", type=int, default=3000, help="ORU^R01 per run (default 3000)")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--patients", type=int, default=200, help="distinct patients (delivery order is per patient)")
    ap.add_argument("--bridge", default=os.environ.get("HL7V2_FHIR_BRIDGE", ""),
                    help="folder where hl7v2-fhir-bridge is installed (pip install --target)")
    args = ap.parse_args()
    kit = _servers()
    tag = kit.uid()[:6]
    bodies = [
        kit.oru(f"{tag}{i:07d}", filler=f"{tag}F{i:07d}", accession=f"{tag}A{i:07d}", placer=f"{tag}P{i:07d}",
                mrn=f"{tag}M{i % args.patients:05d}",
                values=[("NM", "SIZE", "1", f"{i % 50}.5"), ("CE", "IMPRESSION", "2", "NORMAL^Normal^LOCAL")])
        for i in range(args.reports)
    ]
    warm = [kit.oru(f"W{tag}{i:06d}", filler=f"W{tag}F{i:06d}", mrn=f"W{tag}M{i % 20}") for i in range(300)]
    with tempfile.TemporaryDirectory(prefix="fhir-bench-") as tmp:
        folder = Path(tmp)
        config = copy_config(folder)
        port = free_port()
        hole = socket.socket()  # an EMR that accepts connections and never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(4096)
        hole_url = f"http://127.0.0.1:{hole.getsockname()[1]}/fhir"
        engine = start_engine(config, engine_env(folder, port, hole_url, "300"), folder / "engine.log")
        try:
            wait_port(port, timeout=120)
            asyncio.run(run_load("127.0.0.1", port, warm, args.connections))
            ingest = asyncio.run(run_load("127.0.0.1", port, bodies, args.connections))
        finally:
            engine.kill()  # every AA is committed; its worker is only waiting on the silent EMR
            engine.wait()
            hole.close()
        db = folder / "engine.db"
        conn = sqlite3.connect(db, timeout=30)
        plans = [json.loads(p) for (p,) in conn.execute(
            "SELECT payload FROM deliveries WHERE ordering_key NOT LIKE 'W%' ORDER BY id")]
        conn.execute("UPDATE deliveries SET state='pending', attempts=0, next_attempt_at=created_at")
        conn.commit()
        conn.close()
        bridge = bridge_rate(args.bridge, bodies)

        emr = kit.Sekmet(folder / "sekmet-engine")
        direct_emr = kit.Sekmet(folder / "sekmet-direct")
        emr.start()
        direct_emr.start()
        try:
            direct = asyncio.run(direct_rate(direct_emr.base_url, plans, 8))
            t0 = time.perf_counter()
            engine = start_engine(config, engine_env(folder, port, emr.base_url, "60"), folder / "engine.log")
            try:
                total = len(plans) + len(warm)
                while True:
                    s = states(db)
                    if s.get("done", 0) + s.get("dead", 0) >= total:
                        break
                    if engine.poll() is not None:
                        raise SystemExit((folder / "engine.log").read_text(errors="replace")[-3000:])
                    time.sleep(0.2)
                delivered = time.perf_counter() - t0
            finally:
                stop(engine)
            final = states(db)
        finally:
            emr.stop()
            direct_emr.stop()

    print(f"ORU^R01 -> DiagnosticReport, {args.reports} reports, {args.connections} connections, "
          f"{args.patients} patients")
    print("| stage | reports/s | p50 / p99 ms | ACK codes |")
    print("|---|---|---|---|")
    print(row("engine: mapped, validated, queued durably, ACKed", ingest))
    if bridge is not None:
        print(f"hl7v2-fhir-bridge parse+convert+validate (one process, not durable): {bridge:,.0f}/s; "
              f"engine/bridge {ingest.rate / bridge:.2f}")
    else:
        print("hl7v2-fhir-bridge: not installed (pass --bridge DIR); no baseline ratio")
    engine_rate = total / delivered
    print(f"delivery to sekmet, 8 parallel: engine {engine_rate:,.1f} reports/s (incl. start-up, stale check "
          f"search + transaction each; states {final}); direct transactions {direct:,.1f}/s; "
          f"engine/direct {engine_rate / direct:.2f}")


if __name__ == "__main__":
    main()
