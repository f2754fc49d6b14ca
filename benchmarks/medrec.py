"""Medication reconciliation benchmark: P patients x 60 resources, each patient's resources POSTed
as one transaction Bundle over HTTP to a running engine (`engine run`, SQLite, durable).

    python benchmarks/medrec.py [--patients 100] [--clients 8] [--lists 500]
    python benchmarks/medrec.py --patients 1000          # the issue's size

Phases, all in one run:
- baseline: the Bundles to a channel with no destination (parse, validate, store as received,
  answer after commit): what reconciliation is measured against;
- medrec: the same Bundles to a channel whose destination is `medrec` (also stored, and every
  resource reconciled into its patient's records in the unit's transaction);
- list: GET /fhir/<channel>/List?patient=... for one patient with 60 resources;
- in-process, no HTTP: fhir.resources validation of the Bundles, extraction + reconciliation
  alone, and the medrec destination's apply on a SQLite store, to show where the time goes.
Prints resources/s for each, the ratio medrec/baseline, the engine process's CPU time per resource
and per List (from /proc: on a shared machine it moves far less than the rates, so compare runs by
it), and the engine's resident and peak memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(ROOT))  # this tree's engine, for the in-process phase
from _load import free_port, rss_mb, wait_port  # noqa: E402

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
PER_PATIENT = 60
TYPES = ("MedicationRequest", "MedicationDispense", "MedicationAdministration", "MedicationStatement")


def write_config(folder: Path, port: int) -> Path:
    (folder / "channels").mkdir()
    (folder / "mappings").mkdir()
    (folder / "engine.yaml").write_text(
        "storage:\n  url: ''\ndicom:\n  enabled: false\nlog_level: WARNING\n"
        f"http:\n  enabled: true\n  host: 127.0.0.1\n  port: {port}\n  token: ''\n"
    )
    accept = f"[{', '.join(TYPES)}, Medication, Bundle]"
    (folder / "channels" / "store.yaml").write_text(  # the baseline: stored as received, nothing else
        f"name: bench-store\nsource: {{type: http}}\ninput: fhir\naccept: {accept}\n"
    )
    table = ROOT / "mappings" / "tables" / "medication_groups.csv"
    (folder / "channels" / "meds.yaml").write_text(
        f"name: bench-meds\nsource: {{type: http}}\ninput: fhir\naccept: {accept}\n"
        f"destinations:\n  - {{name: records, type: medrec, table: {table}}}\n"
    )
    return folder / "engine.yaml"


def patient_bundle(p: int, today: date) -> dict[str, Any]:
    """60 resources: 15 medications seen as request, dispense, administration and statement,
    spread over 300 days (so some fall out of the window), one in twelve stopped or in error."""
    entries = []
    for i in range(PER_PATIENT):
        rtype = TYPES[i % 4]
        rid = f"p{p}-{i}"
        day = (today - timedelta(days=(i * 37 + p) % 300)).isoformat()
        drug = (i // 4) % 15
        concept = {"coding": [{"system": RXNORM, "code": str(200000 + drug), "display": f"drug {drug}"}]}
        res: dict[str, Any] = {"resourceType": rtype, "id": rid, "subject": {"reference": f"Patient/p{p}"},
                               "medicationCodeableConcept": concept}
        status = "entered-in-error" if i % 12 == 11 else None
        if rtype == "MedicationRequest":
            res |= {"status": status or ("active" if i % 8 == 0 else "completed"), "intent": "order",
                    "authoredOn": day, "dosageInstruction": [{"text": "1 tablet daily"}]}
        elif rtype == "MedicationDispense":
            res |= {"status": status or "completed", "whenHandedOver": f"{day}T10:00:00Z"}
        elif rtype == "MedicationAdministration":
            res |= {"status": status or "completed", "effectiveDateTime": f"{day}T08:00:00+02:00"}
        else:
            res |= {"status": status or "completed", "effectivePeriod": {"start": day}}
        entries.append({"fullUrl": f"{rtype}/{rid}", "resource": res,
                        "request": {"method": "PUT", "url": f"{rtype}/{rid}"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


async def post_all(base: str, channel: str, bodies: list[bytes], clients: int) -> tuple[float, dict[int, int]]:
    codes: dict[int, int] = {}
    chunks = [bodies[i::clients] for i in range(clients)]

    async def one(chunk: list[bytes]) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            for body in chunk:
                r = await client.post(f"/fhir/{channel}", content=body,
                                      headers={"Content-Type": "application/fhir+json"})
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(c) for c in chunks))
    return time.perf_counter() - t0, codes


async def get_lists(base: str, channel: str, n: int, clients: int) -> tuple[float, int]:
    sizes: list[int] = []

    async def one(k: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            for _ in range(k):
                r = await client.get(f"/fhir/{channel}/List", params={"patient": "p0"})
                r.raise_for_status()
                sizes.append(len(r.json().get("contained") or []))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(n // clients) for _ in range(clients)))
    return time.perf_counter() - t0, sizes[0] if sizes else 0


def cpu_seconds(pid: int) -> float:
    """user + system CPU the process has used (Linux /proc): the engine's cost per resource,
    which the other load on a shared machine changes far less than the wall-clock rate."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_store(bundles: list[dict[str, Any]], folder: Path) -> float:
    """Resources/s through the medrec destination's apply on a SQLite store, no HTTP and no
    validation, committing every 20 Bundles (the writer groups commits likewise)."""
    from engine.runtime.destinations.base import MessageContext
    from engine.runtime.destinations.medrec import MedrecDestination, MedrecDestinationConfig
    from engine.store import crypto
    from engine.store.db import init_db, make_engine

    class View:
        def __init__(self, resource: dict[str, Any]) -> None:
            self.resource = resource

    crypto.configure(crypto.Keyring(None))
    db = make_engine(f"sqlite:///{folder / 'apply.db'}")
    init_db(db)
    dest = MedrecDestination(MedrecDestinationConfig(name="records", type="medrec"), base_dir=ROOT)
    t0 = time.perf_counter()
    with db.connect() as conn:
        for start in range(0, len(bundles), 20):
            with conn.begin():
                for b in bundles[start:start + 20]:
                    dest.apply(conn, MessageContext("bench", b"", View(b), "Bundle", "", "", datetime.now(UTC)), [])
    rate = len(bundles) * PER_PATIENT / (time.perf_counter() - t0)
    db.dispose()
    return rate


def in_process(bundles: list[dict[str, Any]]) -> tuple[float, float]:
    """(validations/s, reconciled resources/s) without HTTP or a database."""
    from engine.fhir.models import model_class
    from engine.medrec.reconcile import reconcile
    from engine.medrec.rules import Rules
    from engine.medrec.sources import extract_all

    cls = model_class("Bundle", "R4B")
    t0 = time.perf_counter()
    for b in bundles:
        cls.model_validate(b)
    validate = len(bundles) * PER_PATIENT / (time.perf_counter() - t0)
    rules = Rules()
    today = rules.today()
    t0 = time.perf_counter()
    for b in bundles:
        sources = [s for _, s in extract_all(b)]
        reconcile(sources[0].patient, sources, rules, today)
    rec = len(bundles) * PER_PATIENT / (time.perf_counter() - t0)
    return validate, rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--lists", type=int, default=400)
    ap.add_argument("--profile", default="", help="py-spy the engine in the medrec phase, folded stacks to this file")
    args = ap.parse_args()
    today = datetime.now(UTC).date()
    bundles = [patient_bundle(p, today) for p in range(args.patients)]
    bodies = [json.dumps(b).encode() for b in bundles]
    resources = args.patients * PER_PATIENT
    print(f"{args.patients} patients x {PER_PATIENT} resources = {resources} resources in {len(bodies)} Bundles "
          f"({sum(map(len, bodies)) / len(bodies) / 1024:.0f} KiB each), {args.clients} clients")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        port = free_port()
        config = write_config(folder, port)
        env = {k: v for k, v in os.environ.items() if k not in ("ENGINE_STORAGE_URL", "ENGINE_API_TOKEN")}
        env["PYTHONPATH"] = str(ROOT)
        engine = subprocess.Popen([sys.executable, "-m", "engine", "run", "-c", str(config)], env=env,
                                  stdout=subprocess.DEVNULL, cwd=ROOT)
        try:
            wait_port(port, 120)
            base = f"http://127.0.0.1:{port}"
            warm = [json.dumps(patient_bundle(args.patients + n, today)).encode() for n in range(10)]
            for channel in ("bench-store", "bench-meds"):  # first requests pay for imports and model set-up
                asyncio.run(post_all(base, channel, warm, 2))
            start_rss, _ = rss_mb(engine.pid)
            cpu0 = cpu_seconds(engine.pid)
            secs_base, codes_base = asyncio.run(post_all(base, "bench-store", bodies, args.clients))
            cpu_base = cpu_seconds(engine.pid) - cpu0
            rss_base, _ = rss_mb(engine.pid)
            spy = None
            if args.profile:  # where the engine's time goes in the medrec phase: py-spy's folded stacks
                spy = subprocess.Popen(["py-spy", "record", "--pid", str(engine.pid), "-o", args.profile, "-f", "raw",
                                        "--nonblocking", "-r", "200"], stdout=subprocess.DEVNULL)
                time.sleep(1)
            cpu0 = cpu_seconds(engine.pid)
            secs_med, codes_med = asyncio.run(post_all(base, "bench-meds", bodies, args.clients))
            cpu_med = cpu_seconds(engine.pid) - cpu0
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            rss_med, _ = rss_mb(engine.pid)
            cpu0 = cpu_seconds(engine.pid)
            secs_list, size = asyncio.run(get_lists(base, "bench-meds", args.lists, args.clients))
            cpu_list = cpu_seconds(engine.pid) - cpu0
            rss_end, peak = rss_mb(engine.pid)
        finally:
            engine.terminate()
            engine.wait(timeout=60)
    validate, rec = in_process(bundles[: min(len(bundles), 200)])
    with tempfile.TemporaryDirectory() as tmp:
        stored = with_store(bundles, Path(tmp))

    base_rate, med_rate = resources / secs_base, resources / secs_med
    print(f"baseline (stored only):      {base_rate:8.0f} resources/s  {len(bodies) / secs_base:6.1f} Bundles/s  "
          f"answers {codes_base}")
    print(f"medrec (stored+reconciled):  {med_rate:8.0f} resources/s  {len(bodies) / secs_med:6.1f} Bundles/s  "
          f"answers {codes_med}")
    print(f"ratio medrec/baseline: {med_rate / base_rate:.2f}   target 10,000 resources/s reconciled: "
          f"{'met' if med_rate >= 10000 else 'not met'}")
    print(f"engine CPU per resource: baseline {cpu_base / resources * 1e6:.0f} us, "
          f"medrec {cpu_med / resources * 1e6:.0f} us (medrec adds {(cpu_med - cpu_base) / resources * 1e6:.0f} us)")
    print(f"List requests (patient with {PER_PATIENT} resources, {size} records): "
          f"{args.lists / secs_list:.0f} lists/s, engine CPU {cpu_list / args.lists * 1e3:.2f} ms per list")
    print(f"in-process, one core: fhir.resources validation {validate:.0f} resources/s; "
          f"extraction + reconciliation {rec:.0f} resources/s;\n"
          f"  medrec apply on a SQLite store (sources, versions, records; a commit per 20 Bundles) "
          f"{stored:.0f} resources/s")
    print(f"engine memory: {start_rss:.0f} MiB after warm-up, {rss_base:.0f} after baseline, "
          f"{rss_med:.0f} after medrec, {rss_end:.0f} after lists; peak {peak:.0f} MiB")


if __name__ == "__main__":
    main()
