"""FHIR-in benchmark: Bundles of medication resources POSTed to the engine's HTTP listener
(validated, stored, fsynced, queued for a `file` destination, then answered) against a bare
FastAPI/uvicorn echo (read the body, answer 200 with it) in the same run.

    python benchmarks/http_in.py [--bundles 80] [--size 60] [--clients 8] [--kinds batch,transaction]

Prints resources/s and p50/p99 request latency for the echo and for the engine per Bundle kind
(batch: one stored unit per entry; transaction: one unit per Bundle), the ratio engine/echo, and,
as the ceiling the engine cannot pass on one core, fhir.resources validation alone (the same
resources, in this process), with the ratio engine/validation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _load import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

ECHO = """
import sys
import uvicorn
from fastapi import FastAPI, Request, Response

app = FastAPI()

@app.post("/fhir/{channel}")
async def echo(channel: str, request: Request) -> Response:
    return Response(await request.body(), 200, media_type="application/fhir+json")

@app.get("/health")
async def health() -> dict:
    return {"status": "ok"}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def resource(kind: str, pid: int, n: int, run: str) -> dict[str, Any]:
    med = {"coding": [{"system": RXNORM, "code": str(197361 + n % 20), "display": f"drug {n % 20}"}]}
    base: dict[str, Any] = {"id": f"{run}-{pid}-{n}", "subject": {"reference": f"Patient/{run}-{pid}"},
                            "medicationCodeableConcept": med}
    if kind == "MedicationRequest":
        return {"resourceType": kind, **base, "status": "active", "intent": "order", "authoredOn": "2026-11-01",
                "dosageInstruction": [{"text": "1 tablet daily"}]}
    if kind == "MedicationDispense":
        return {"resourceType": kind, **base, "status": "completed", "whenHandedOver": "2026-11-02T10:00:00Z"}
    if kind == "MedicationAdministration":
        return {"resourceType": kind, **base, "status": "completed", "effectiveDateTime": "2026-11-03T08:00:00Z"}
    return {"resourceType": kind, **base, "status": "active", "effectiveDateTime": "2026-11-04"}


KINDS = ["MedicationRequest", "MedicationDispense", "MedicationAdministration", "MedicationStatement"]


def bundles(count: int, size: int, bundle_type: str, run: str) -> list[bytes]:
    out = []
    for pid in range(count):
        entries = []
        for n in range(size):
            r = resource(KINDS[n % 4], pid, n, run)
            entries.append({"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}})
        out.append(json.dumps({"resourceType": "Bundle", "type": bundle_type, "entry": entries}).encode())
    return out


async def post_all(base: str, path: str, bodies: list[bytes], clients: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    headers = {"Content-Type": "application/fhir+json"}

    async def one(client: httpx.AsyncClient, share: list[bytes]) -> None:
        for body in share:
            t0 = time.perf_counter()
            resp = await client.post(path, content=body, headers=headers)
            latencies.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                raise SystemExit(f"{base}{path} answered {resp.status_code}: {resp.text[:300]}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        # warm-up, one Bundle per client: connections, imports, model classes, worker processes
        await asyncio.gather(*(one(client, [b]) for b in bodies[:clients]))
        latencies.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, bodies[clients + i::clients]) for i in range(clients)))
        return time.perf_counter() - t0, latencies


def wait_health(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(log.read_text(errors="replace") if log.exists() else "process exited")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{base} did not come up")


def validation_rate(bodies: list[bytes]) -> float:
    """Resources/s fhir.resources (R4B) validates, each resource with its own class, in this process."""
    from fhir.resources.R4B import get_fhir_model_class

    resources = [e["resource"] for b in bodies for e in json.loads(b)["entry"]]
    classes = {k: get_fhir_model_class(k) for k in KINDS}
    for r in resources[:50]:  # warm-up
        classes[r["resourceType"]].model_validate(r)
    t0 = time.perf_counter()
    for r in resources:
        classes[r["resourceType"]].model_validate(r)
    return len(resources) / (time.perf_counter() - t0)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


def report(name: str, seconds: float, latencies: list[float], resources: int) -> float:
    rate = resources / seconds
    print(f"{name:<32} {rate:>9.0f} resources/s  {len(latencies) / seconds:>7.1f} bundles/s  "
          f"p50 {statistics.median(latencies) * 1000:>7.1f} ms  p99 {pct(latencies, 0.99):>7.1f} ms", flush=True)
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundles", type=int, default=80)
    ap.add_argument("--size", type=int, default=60)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--kinds", default="batch,transaction")
    args = ap.parse_args()
    measured = args.bundles * args.size  # the warm-up Bundles (one per client) are not counted

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "channels").mkdir()
        eport, bport = free_port(), free_port()
        (folder / "engine.yaml").write_text(
            f"storage:\n  url: sqlite:///{folder / 'engine.db'}\ndicom:\n  enabled: false\nlog_level: WARNING\n"
            f"http:\n  enabled: true\n  port: {eport}\n  token: ''\n"
        )
        (folder / "channels" / "meds.yaml").write_text(
            "name: meds\nsource: {type: http}\ninput: fhir\n"
            f"accept: [{', '.join(KINDS)}, Bundle]\n"
            f"destinations:\n  - {{name: archive, type: file, directory: {folder / 'out'}, content: raw}}\n"
        )
        (folder / "echo.py").write_text(ECHO)
        env = dict(os.environ)
        env.pop("ENGINE_STORAGE_URL", None)
        env.pop("ENGINE_API_TOKEN", None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        elog = folder / "engine.log"
        with open(elog, "wb") as out:
            engine = subprocess.Popen([sys.executable, "-m", "engine", "run", "-c", str(folder / "engine.yaml")],
                                      env=env, stdout=out, stderr=out, cwd=folder)
        echo = subprocess.Popen([sys.executable, str(folder / "echo.py"), str(bport)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ebase, bbase = f"http://127.0.0.1:{eport}", f"http://127.0.0.1:{bport}"
            wait_health(bbase, echo, folder / "none")
            wait_health(ebase, engine, elog)
            print(f"{args.bundles} Bundles of {args.size} resources, {args.clients} parallel clients", flush=True)
            echo_bodies = bundles(args.bundles + args.clients, args.size, "batch", "e")
            secs, lat = asyncio.run(post_all(bbase, "/fhir/meds", echo_bodies, args.clients))
            baseline = report("bare FastAPI echo", secs, lat, measured)
            ceiling = validation_rate(bundles(args.bundles, args.size, "batch", "v"))
            print(f"{'validation alone':<32} {ceiling:>9.0f} resources/s  (fhir.resources, one core, no I/O)",
                  flush=True)
            for i, kind in enumerate(k for k in args.kinds.split(",") if k):
                bodies = bundles(args.bundles + args.clients, args.size, kind, f"r{i}")
                secs, lat = asyncio.run(post_all(ebase, "/fhir/meds", bodies, args.clients))
                rate = report(f"engine, {kind}", secs, lat, measured)
                print(f"{'':<32} ratio engine/echo {rate / baseline:.3f}, engine/validation {rate / ceiling:.2f}",
                      flush=True)
        finally:
            for proc in (engine, echo):
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
