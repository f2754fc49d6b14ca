"""Orders benchmark: "MLLP order in -> item queryable" through the shipped `ris-orders` channel.

    python benchmarks/orders.py [--messages 20000] [--connections 8] [--check 20] [--repeats 50]
                                [--without-archive] [--log-level INFO]

Starts the engine as a subprocess (`python -m engine run -c <tmp>/engine.yaml`) on a temporary
copy of the shipped configuration (engine.yaml, channels/ris-orders.yaml, mappings/), with a
temporary SQLite store and free ports, and the bare asyncio MLLP loop (bare_mllp.py) as the
baseline. Streams the same unique ORM^O01 orders (one order each, `_load.orm`) to both over N
connections with one message in flight per connection, and prints orders/s, p50/p99 ACK latency
and the ratio engine/bare. Then, against the engine's worklist SCP (pynetdicom SCU, TCP_NODELAY):

- checks that a random sample of the accepted accessions is queryable (exactly one answer each,
  with the right patient and SPS start) and that the worklist holds one item per order;
- times the C-FIND for one accession at that size (median, p90 over `--repeats` queries);
- times single orders end to end: send over MLLP, wait for the ACK, C-FIND the accession.

Target: >= 2,000 orders/s with 8 senders on the 2-core development machine. Figures are printed
as measured; the target line says whether they meet it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _load import LoadResult, free_port, orm, rss_mb, run_load, wait_port  # noqa: E402  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]  # noqa: E402

from engine.dicom.scp import quiet_pynetdicom, set_nodelay  # noqa: E402
from engine.hl7.mllp import MLLPClient  # noqa: E402

TARGET_RATE = 2000.0
AET = "ENGINE"
ORDER_DATE, ORDER_TIME = "20261126", "100000"  # ORC-7.4 of `_load.orm`


# -- set-up ------------------------------------------------------------------------------------------------


def copy_config(folder: Path, *, without_archive: bool) -> Path:
    """engine.yaml, channels/ris-orders.yaml and mappings/ as shipped (ris-results is left out)."""
    shutil.copy2(ROOT / "engine.yaml", folder / "engine.yaml")
    (folder / "channels").mkdir()
    channel = (ROOT / "channels" / "ris-orders.yaml").read_text()
    if without_archive:
        head, sep, _ = channel.partition("  - name: archive\n")
        if not sep:
            raise SystemExit("channels/ris-orders.yaml has no `archive` destination to leave out")
        channel = head
    (folder / "channels" / "ris-orders.yaml").write_text(channel)
    shutil.copytree(ROOT / "mappings", folder / "mappings")
    return folder / "engine.yaml"


def engine_env(folder: Path, mllp_port: int, dicom_port: int, log_level: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "ENGINE_STORAGE_URL": f"sqlite:///{folder / 'engine.db'}",
            "ORDERS_MLLP_PORT": str(mllp_port),
            "DICOM_PORT": str(dicom_port),
            "HTTP_PORT": "0",
            "MEDS_ARCHIVE_DIR": str(folder / "meds-archive"),
            "DICOM_AET": AET,
            "ORDERS_ARCHIVE_DIR": str(folder / "archive"),
            "ENGINE_LOG_LEVEL": log_level,
            "BIND_HOST": "127.0.0.1",
        }
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worklist_counts(db: Path) -> tuple[int, int]:
    """(scheduled worklist items, stored messages), read from the engine's SQLite file."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        items = conn.execute("SELECT count(*) FROM worklist_items WHERE status = 'SCHEDULED'").fetchone()[0]
        messages = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        conn.close()
    return int(items), int(messages)


# -- C-FIND --------------------------------------------------------------------------------------------------


def accession_query(accession: str) -> Dataset:
    """The IHE RAD-5 patient query shape: one accession, a modality's usual return keys."""
    ds = Dataset()
    ds.AccessionNumber = accession
    for keyword in ("PatientName", "PatientID", "RequestedProcedureID", "StudyInstanceUID"):
        setattr(ds, keyword, "")
    step = Dataset()
    for keyword in (
        "Modality",
        "ScheduledStationAETitle",
        "ScheduledProcedureStepStartDate",
        "ScheduledProcedureStepStartTime",
    ):
        setattr(step, keyword, "")
    ds.ScheduledProcedureStepSequence = [step]
    return ds


class WorklistSCU:
    """One association to the engine's SCP, reused for every query (TCP_NODELAY on our socket)."""

    def __init__(self, port: int) -> None:
        quiet_pynetdicom()
        self.ae = AE(ae_title="BENCHSCU")
        self.ae.add_requested_context(ModalityWorklistInformationFind)
        self.assoc = self.ae.associate("127.0.0.1", port, ae_title=AET)
        if not self.assoc.is_established:
            raise RuntimeError(f"association to the worklist SCP on port {port} failed")
        set_nodelay(self.assoc.dul.socket.socket)  # type: ignore[union-attr]

    def find(self, query: Dataset) -> tuple[float, list[Dataset]]:
        t0 = time.perf_counter()
        answers: list[Dataset] = []
        for status, identifier in self.assoc.send_c_find(query, ModalityWorklistInformationFind):
            if status is None or "Status" not in status:
                raise RuntimeError("C-FIND: no response (association aborted?)")
            if status.Status in (0xFF00, 0xFF01):
                answers.append(identifier)
            elif status.Status != 0x0000:
                raise RuntimeError(f"C-FIND failed with status 0x{status.Status:04X}")
        return time.perf_counter() - t0, answers

    def close(self) -> None:
        self.assoc.release()
        self.ae.shutdown()


def check_sample(scu: WorklistSCU, orders: list[tuple[str, str]]) -> list[str]:
    """Each (accession, patient) must come back exactly once with the right keys; returns the problems."""
    problems = []
    for accession, patient in orders:
        _, answers = scu.find(accession_query(accession))
        if len(answers) != 1:
            problems.append(f"{accession}: {len(answers)} answers")
            continue
        a = answers[0]
        step = a.ScheduledProcedureStepSequence[0]
        got = (
            a.AccessionNumber,
            a.PatientID,
            a.RequestedProcedureID,
            step.Modality,
            step.ScheduledProcedureStepStartDate,
            step.ScheduledProcedureStepStartTime,
        )
        want = (accession, patient, f"RP{accession}", "CT", ORDER_DATE, ORDER_TIME)
        if got != want:
            problems.append(f"{accession}: got {got}, expected {want}")
    return problems


def ms(seconds: list[float], q: float) -> float:
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def end_to_end(mllp_port: int, scu: WorklistSCU, tag: str, repeats: int) -> tuple[list[float], int]:
    """Send one order, wait for its ACK, then C-FIND its accession: (seconds per order, misses)."""
    timings: list[float] = []
    misses = 0
    async with MLLPClient("127.0.0.1", mllp_port, read_timeout=60) as client:
        for i in range(repeats):
            accession = f"E{tag}{i:05d}"
            t0 = time.perf_counter()
            ack = await client.send(orm(f"E2E-{tag}-{i}", accession, patient=f"EP{tag}{i}"))
            if b"MSA|AA|" not in ack:
                raise RuntimeError(f"order {accession} was not accepted: {ack!r}")
            _, answers = await asyncio.to_thread(scu.find, accession_query(accession))
            timings.append(time.perf_counter() - t0)
            misses += len(answers) != 1
    return timings, misses


# -- run ------------------------------------------------------------------------------------------------------


def bodies_for(tag: str, count: int, patients: int) -> tuple[list[bytes], list[tuple[str, str]]]:
    """`count` unique orders (control id, order numbers, accession), spread over `patients` patients."""
    bodies, keys = [], []
    for i in range(count):
        accession = f"{tag}{i:07d}"  # 12 characters: fits SH (16)
        patient = f"P{tag}{i % patients:06d}"
        bodies.append(orm(f"{tag}-{i}", accession, patient=patient))
        keys.append((accession, patient))
    return bodies, keys


def report_row(name: str, r: LoadResult) -> str:
    return f"{name:<8} {r.rate:>10.0f} {r.p50:>8.2f} {r.pct(0.99):>8.2f} {r.seconds:>8.2f}  {r.codes}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000, help="orders per run (default 20000)")
    ap.add_argument("--connections", type=int, default=8, help="concurrent senders, one order in flight each")
    ap.add_argument("--check", type=int, default=20, help="random accessions checked through C-FIND")
    ap.add_argument("--repeats", type=int, default=50, help="timed C-FIND queries and end-to-end orders")
    ap.add_argument("--patients", type=int, default=5000, help="distinct patients the orders are spread over")
    ap.add_argument("--warmup", type=int, default=500, help="orders sent to each server before timing")
    ap.add_argument(
        "--without-archive", action="store_true", help="leave the shipped `archive` file destination out of the channel"
    )
    ap.add_argument("--log-level", default="INFO", help="ENGINE_LOG_LEVEL (the shipped default is INFO)")
    args = ap.parse_args()
    if args.messages < 1 or args.connections < 1:
        ap.error("--messages and --connections must be at least 1")

    rnd = random.Random()
    tag = f"{rnd.randrange(1000, 10000)}"
    with tempfile.TemporaryDirectory(prefix="orders-bench-") as tmp:
        folder = Path(tmp)
        config = copy_config(folder, without_archive=args.without_archive)
        mllp_port, dicom_port, bare_port = free_port(), free_port(), free_port()
        env = engine_env(folder, mllp_port, dicom_port, args.log_level)
        engine_log = (folder / "engine.log").open("wb")
        engine = subprocess.Popen(
            [sys.executable, "-m", "engine", "run", "-c", str(config)],
            env=env,
            cwd=folder,
            stdout=engine_log,
            stderr=subprocess.STDOUT,
        )
        bare = subprocess.Popen([sys.executable, str(HERE / "bare_mllp.py"), str(bare_port)], stdout=subprocess.DEVNULL)
        procs: list[subprocess.Popen[Any]] = [engine, bare]
        try:
            try:
                wait_port(mllp_port)
                wait_port(dicom_port)
                wait_port(bare_port)
            except RuntimeError:
                engine_log.flush()
                print((folder / "engine.log").read_text(errors="replace")[-3000:], file=sys.stderr)
                raise

            warm, _ = bodies_for(f"W{tag}", args.warmup, args.patients)
            bodies, keys = bodies_for(f"B{tag}", args.messages, args.patients)
            if warm:
                asyncio.run(run_load("127.0.0.1", bare_port, warm, args.connections))
                w = asyncio.run(run_load("127.0.0.1", mllp_port, warm, args.connections))
                if w.codes != {"AA": len(warm)}:
                    raise SystemExit(f"warm-up orders not all accepted: {w.codes}")

            b = asyncio.run(run_load("127.0.0.1", bare_port, bodies, args.connections))
            cpu0 = cpu_seconds(engine.pid)
            e = asyncio.run(run_load("127.0.0.1", mllp_port, bodies, args.connections))
            engine_cpu = (cpu_seconds(engine.pid) - cpu0) / e.seconds
            rss, hwm = rss_mb(engine.pid)

            items, messages = worklist_counts(folder / "engine.db")
            scu = WorklistSCU(dicom_port)
            try:
                sample = rnd.sample(keys, min(args.check, len(keys)))
                problems = check_sample(scu, sample)
                timed = [scu.find(accession_query(rnd.choice(keys)[0]))[0] for _ in range(args.repeats)]
                e2e, misses = asyncio.run(end_to_end(mllp_port, scu, tag, args.repeats))
            finally:
                scu.close()
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            engine_log.close()

        archive = "without the archive destination" if args.without_archive else "with the shipped archive (file)"
        print(
            f"\n{args.messages} unique ORM^O01 orders over {args.connections} connections (one in flight each), "
            f"after {args.warmup} warm-up orders"
        )
        print(
            f"engine: shipped ris-orders channel {archive}, SQLite WAL synchronous=FULL, "
            f"log level {args.log_level}; {os.cpu_count()} CPUs"
        )
        print(f"{'':<8} {'orders/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'seconds':>8}  answers")
        print(report_row("engine", e))
        print(report_row("bare", b))
        print(
            f"ratio engine/bare: {e.rate / b.rate:.2f}   engine CPU {engine_cpu * 100:.0f}% of one core, "
            f"{engine_cpu * 1e6 / e.rate:.0f} us CPU per order, RSS {rss:.0f} MB (peak {hwm:.0f} MB)"
        )
        expected_items = args.messages + args.warmup
        print(f"worklist: {items} scheduled items, {messages} stored messages (expected {expected_items} each)")
        print(
            f"C-FIND check of {len(sample)} random accessions: "
            + ("all found with the right keys" if not problems else f"{len(problems)} problems")
        )
        for p in problems[:10]:
            print(f"  {p}")
        print(
            f"C-FIND one accession at {items} items: median {statistics.median(timed) * 1000:.2f} ms, "
            f"p90 {ms(timed, 0.9):.2f} ms ({len(timed)} queries, one association)"
        )
        print(
            f"one order end to end (MLLP send -> AA -> C-FIND answer): median "
            f"{statistics.median(e2e) * 1000:.2f} ms, p90 {ms(e2e, 0.9):.2f} ms; "
            f"{misses} of {len(e2e)} not queryable right after their ACK"
        )
        ok_rate = e.rate >= TARGET_RATE
        verdict = "meets" if ok_rate else "BELOW"
        print(f"target >= {TARGET_RATE:.0f} orders/s with {args.connections} senders: {verdict} ({e.rate:.0f})")
        failed = (
            problems
            or misses
            or e.codes != {"AA": args.messages}
            or items != expected_items
            or messages != expected_items
        )
        if failed:
            print("CHECKS FAILED (see above)")
            sys.exit(1)


if __name__ == "__main__":
    main()
