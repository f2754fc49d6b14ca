"""Results benchmark: ORU^R01 over MLLP -> validated DiagnosticReport queued and ACKed, then
delivered to a real FHIR server (sekmet).

    python benchmarks/fhir_results.py [--reports 1500] [--repeat 2] [--connections 8] [--patients 200]
                                      [--bridge /path/to/hl7v2-fhir-bridge]

1. Ingest: the engine runs as a subprocess (`python -m engine run`) on a temporary copy of the
   shipped configuration (ris-results with its FHIR destination only; the raw outbox is left
   out), its EMR a listening socket that never answers, so nothing is delivered while the
   senders run. N unique ORU^R01 (report text, a numeric and a coded OBX) go over 8 connections,
   one message in flight each: reports/s, p50/p99 ACK latency and the engine process's CPU time
   per report (the figure a loaded machine disturbs least). Every AA means the report was
   mapped, built, validated (fhir.resources R4B) and queued durably.
   Baseline in the same run, interleaved (--repeat rounds of each): the same channel and mapping
   with no destination (parse, map, store, ACK), a second engine process.
   Baseline in the same run, where it is installed (`pip install --target DIR --no-deps
   hl7v2-fhir-bridge`, pass DIR with --bridge): that converter's parse + convert + validate of
   the same messages to a transaction Bundle, in one process, nothing durable.
2. Delivery: the engine is restarted with sekmet as its EMR and drains the queue (8 parallel
   requests; the shipped stale-report check reads each group of reports with one search, then
   each report is one transaction), timed from the moment the engine listens.
   Baseline: the same transaction Bundles (built by the engine's own writer from the queued
   plans, no stale check) POSTed straight to a second, fresh sekmet with 8 parallel requests,
   half before and half after the engine's run.
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
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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


def copy_config(folder: Path, *, fhir: bool = True) -> Path:
    """The shipped configuration; ris-results with only its FHIR destination, or with none."""
    folder.mkdir(exist_ok=True)
    shutil.copy2(ROOT / "engine.yaml", folder / "engine.yaml")
    (folder / "channels").mkdir()
    channel = (ROOT / "channels" / "ris-results.yaml").read_text()
    head, sep, _ = channel.partition("  - name: outbox\n")
    if not sep:
        raise SystemExit("channels/ris-results.yaml has no `outbox` destination to leave out")
    if not fhir:
        head = head.partition("destinations:\n")[0] + "destinations: []\n"
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


@dataclass
class Ingest:
    load: LoadResult
    cpu_ms: float  # engine CPU time per report


def ingest_round(port: int, pid: int, bodies: list[bytes], connections: int) -> Ingest:
    before = cpu_seconds(pid)
    load = asyncio.run(run_load("127.0.0.1", port, bodies, connections))
    return Ingest(load, (cpu_seconds(pid) - before) / len(bodies) * 1000)


def row(name: str, runs: list[Ingest]) -> str:
    rate = statistics.median(r.load.rate for r in runs)
    cpu = statistics.median(r.cpu_ms for r in runs)
    p50 = statistics.median(r.load.p50 for r in runs)
    p99 = statistics.median(r.load.pct(0.99) for r in runs)
    codes: dict[str, int] = {}
    for r in runs:
        for k, v in r.load.codes.items():
            codes[k] = codes.get(k, 0) + v
    return f"| {name} | {rate:,.0f} | {cpu:.2f} | {p50:.2f} / {p99:.2f} | {codes} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reports", type=int, default=1500, help="ORU^R01 per ingest round (default 1500)")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved ingest rounds of each engine (default 2)")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--patients", type=int, default=200, help="distinct patients (delivery order is per patient)")
    ap.add_argument("--bridge", default=os.environ.get("HL7V2_FHIR_BRIDGE", ""),
                    help="folder where hl7v2-fhir-bridge is installed (pip install --target)")
    args = ap.parse_args()
    kit = _servers()
    tag = kit.uid()[:6]

    def batch(prefix: str) -> list[bytes]:
        return [
            kit.oru(f"{prefix}{i:07d}", filler=f"{prefix}F{i:07d}", accession=f"{prefix}A{i:07d}",
                    placer=f"{prefix}P{i:07d}", mrn=f"{prefix}M{i % args.patients:05d}",
                    values=[("NM", "SIZE", "1", f"{i % 50}.5"), ("CE", "IMPRESSION", "2", "NORMAL^Normal^LOCAL")])
            for i in range(args.reports)
        ]

    rounds = [batch(f"{tag}{n}") for n in range(args.repeat)]
    warm = [kit.oru(f"W{tag}{i:06d}", filler=f"W{tag}F{i:06d}", mrn=f"W{tag}M{i % 20}") for i in range(300)]
    with tempfile.TemporaryDirectory(prefix="fhir-bench-") as tmp:
        folder = Path(tmp)
        config = copy_config(folder / "fhir")
        bare_config = copy_config(folder / "bare", fhir=False)
        port, bare_port = free_port(), free_port()
        hole = socket.socket()  # an EMR that accepts connections and never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(4096)
        hole_url = f"http://127.0.0.1:{hole.getsockname()[1]}/fhir"
        engine = start_engine(config, engine_env(folder / "fhir", port, hole_url, "300"), folder / "engine.log")
        bare = start_engine(bare_config, engine_env(folder / "bare", bare_port, hole_url, "300"), folder / "bare.log")
        fhir_runs: list[Ingest] = []
        bare_runs: list[Ingest] = []
        try:
            wait_port(port, timeout=120)
            wait_port(bare_port, timeout=120)
            asyncio.run(run_load("127.0.0.1", port, warm, args.connections))
            asyncio.run(run_load("127.0.0.1", bare_port, warm, args.connections))
            for bodies in rounds:  # interleaved: the machine is shared, its load drifts
                fhir_runs.append(ingest_round(port, engine.pid, bodies, args.connections))
                bare_runs.append(ingest_round(bare_port, bare.pid, bodies, args.connections))
        finally:
            engine.kill()  # every AA is committed; its worker is only waiting on the silent EMR
            bare.kill()
            engine.wait()
            bare.wait()
            hole.close()
        db = folder / "fhir" / "engine.db"
        conn = sqlite3.connect(db, timeout=30)
        plans = [json.loads(p) for (p,) in conn.execute(
            "SELECT payload FROM deliveries WHERE ordering_key NOT LIKE 'W%' ORDER BY id")]
        conn.execute("UPDATE deliveries SET state='pending', attempts=0, next_attempt_at=created_at")
        conn.commit()
        conn.close()
        bridge = bridge_rate(args.bridge, rounds[0])

        emr = kit.Sekmet(folder / "sekmet-engine")
        direct_emr = kit.Sekmet(folder / "sekmet-direct")
        emr.start()
        direct_emr.start()
        half = len(plans) // 2
        try:
            direct = [asyncio.run(direct_rate(direct_emr.base_url, plans[:half], 8))]
            engine = start_engine(config, engine_env(folder / "fhir", port, emr.base_url, "60"), folder / "engine.log")
            try:
                total = len(plans) + len(warm)
                wait_port(port, timeout=120)
                t0 = time.perf_counter()
                done0 = states(db).get("done", 0)
                while True:
                    s = states(db)
                    if s.get("done", 0) + s.get("dead", 0) >= total:
                        break
                    if engine.poll() is not None:
                        raise SystemExit((folder / "engine.log").read_text(errors="replace")[-3000:])
                    time.sleep(0.1)
                delivered = time.perf_counter() - t0
            finally:
                stop(engine)
            final = states(db)
            direct.append(asyncio.run(direct_rate(direct_emr.base_url, plans[half:], 8)))
        finally:
            emr.stop()
            direct_emr.stop()

    print(f"ORU^R01 -> DiagnosticReport, {args.reports} reports x {args.repeat} rounds, {args.connections} "
          f"connections, {args.patients} patients (medians)")
    print("| stage | reports/s | engine CPU ms/report | p50 / p99 ms | ACK codes |")
    print("|---|---|---|---|---|")
    print(row("engine: mapped, validated, queued durably, ACKed", fhir_runs))
    print(row("same channel, no destination: mapped, stored, ACKed", bare_runs))
    fhir_rate = statistics.median(r.load.rate for r in fhir_runs)
    bare_rate = statistics.median(r.load.rate for r in bare_runs)
    extra = statistics.median(r.cpu_ms for r in fhir_runs) - statistics.median(r.cpu_ms for r in bare_runs)
    print(f"FHIR destination: {fhir_rate / bare_rate:.2f} of the rate without it; it adds {extra:.2f} ms CPU a report")
    if bridge is not None:
        print(f"hl7v2-fhir-bridge parse+convert+validate (one process, not durable): {bridge:,.0f}/s; "
              f"engine/bridge {fhir_rate / bridge:.2f}")
    else:
        print("hl7v2-fhir-bridge: not installed (pass --bridge DIR); no baseline ratio")
    engine_rate = (total - done0) / delivered
    direct_mean = statistics.mean(direct)
    stale = os.environ.get("EMR_STALE_CHECK", "true").lower() not in ("false", "0", "no")
    how = "stale check + transaction" if stale else "transaction, EMR_STALE_CHECK=false"
    print(f"delivery to sekmet, 8 parallel: engine {engine_rate:,.1f} reports/s ({how}; states "
          f"{final}); direct transactions {direct_mean:,.1f}/s ({direct[0]:,.1f} before, {direct[1]:,.1f} after); "
          f"engine/direct {engine_rate / direct_mean:.2f}")


if __name__ == "__main__":
    main()
