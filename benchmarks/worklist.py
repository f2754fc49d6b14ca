"""Worklist C-FIND benchmark: the engine's indexed MWL SCP against dcmtk's wlmscpfs, in the same run.

    python benchmarks/worklist.py [--sizes 10000 100000] [--repeats 25] [--wlm-repeats-large 5]
                                  [--db-url postgresql+psycopg://...] [--workdir DIR]

For each size: bulk-inserts that many SCHEDULED items (spread over 30 days, 20 stations, 6
modalities) into a fresh store, writes the same items as .wl files for wlmscpfs (folder
<dir>/ENGINE/ with a lockfile), starts both servers, and times two IHE RAD-5 query shapes with a
pynetdicom SCU (TCP_NODELAY on its socket) over one established association per server:

- patient query: one accession number (a different one each time)
- broad query: one station's day (SPS station AE title + SPS start date, modality universal)

Prints the median and p90 per query, the answer counts (which must agree between the servers) and
the ratio wlmscpfs/engine, then checks the targets: >= 20x faster than wlmscpfs on the accession
query at 10,000 items, and accession latency at 100,000 within 2x of that at 10,000.
wlmscpfs reads every file on every query; at sizes over 10,000 it gets `--wlm-repeats-large`
queries per shape (default 5) so the run stays within minutes.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import free_port, wait_port  # noqa: E402
from pydicom.datadict import dictionary_VR, keyword_dict  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]  # noqa: E402
from sqlalchemy import Engine  # noqa: E402

from engine.dicom.scp import DicomApplication, quiet_pynetdicom, set_nodelay  # noqa: E402
from engine.dicom.services.echo import EchoService  # noqa: E402
from engine.dicom.services.mwl import WorklistService  # noqa: E402
from engine.store.db import make_engine, sqlite_url_for  # noqa: E402
from engine.store.worklist import WorklistItem, insert_many  # noqa: E402

AET = "ENGINE"
DAYS = 30
STATIONS = [f"STATION{n:02d}" for n in range(20)]
MODALITIES = ["CT", "MR", "US", "CR", "MG", "XA"]
FIRST_NAMES = ["JOHN", "JANE", "ALEX", "MARIA", "PETER", "ANNA", "LUC", "SARA", "OMAR", "LENA"]
LAST_NAMES = ["SMITH", "MILLER", "GARCIA", "MUELLER", "ROSSI", "DUBOIS", "NOVAK", "JANSEN", "KOWALSKI", "LEE"]


# -- data ----------------------------------------------------------------------------------------------


def day(n: int) -> str:
    return time.strftime("%Y%m%d", time.gmtime(1795000000 + 86400 * n))  # late Nov 2026 onwards


def make_items(count: int, seed: int = 7) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    items = []
    for n in range(count):
        station = rnd.randrange(len(STATIONS))
        hour, minute = rnd.randrange(7, 19), rnd.randrange(0, 60, 5)
        desc = f"{MODALITIES[station % 6]} EXAM {rnd.randrange(40):02d}"
        items.append(
            {
                "PatientID": f"PID{rnd.randrange(count * 3 // 4 + 1):08d}",
                "IssuerOfPatientID": "HOSP",
                "PatientName": f"{rnd.choice(LAST_NAMES)}{n % 97}^{rnd.choice(FIRST_NAMES)}",
                "PatientBirthDate": f"19{rnd.randrange(30, 99)}{rnd.randrange(1, 13):02d}{rnd.randrange(1, 28):02d}",
                "PatientSex": rnd.choice("MF"),
                "ReferringPhysicianName": "REFERRER^RITA",
                "AccessionNumber": f"ACC{n:09d}",
                "RequestedProcedureID": f"RP{n:09d}",
                "StudyInstanceUID": f"1.2.826.0.1.3680043.10.543.{n}",
                "RequestedProcedureDescription": desc,
                "RequestedProcedurePriority": "ROUTINE",
                "FillerOrderNumberImagingServiceRequest": f"F{n:09d}",
                "PlacerOrderNumberImagingServiceRequest": f"P{n:09d}",
                "ScheduledProcedureStepSequence": [
                    {
                        "ScheduledStationAETitle": STATIONS[station],
                        "ScheduledProcedureStepStartDate": day(rnd.randrange(DAYS)),
                        "ScheduledProcedureStepStartTime": f"{hour:02d}{minute:02d}00",
                        "Modality": MODALITIES[station % 6],
                        "ScheduledPerformingPhysicianName": "",
                        "ScheduledProcedureStepDescription": desc,
                        "ScheduledProcedureStepID": f"SPS{n:09d}",
                        "ScheduledProcedureStepLocation": f"ROOM {station}",
                    }
                ],
            }
        )
    return items


# -- .wl files for wlmscpfs (a minimal implicit VR little endian encoder: pydicom takes ~3 ms a file) ------


def _element(keyword: str, value: Any) -> bytes:
    tag = keyword_dict[keyword]
    group, elem = tag >> 16, tag & 0xFFFF
    if isinstance(value, list):
        body = b"".join(
            struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + _encode(v) + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
            for v in value
        )
        return struct.pack("<HHI", group, elem, 0xFFFFFFFF) + body + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    raw = str(value).encode("ascii")
    if len(raw) % 2:
        raw += b"\0" if dictionary_VR(tag) == "UI" else b" "
    return struct.pack("<HHI", group, elem, len(raw)) + raw


def _encode(item: dict[str, Any]) -> bytes:
    return b"".join(_element(k, item[k]) for k in sorted(item, key=lambda k: keyword_dict[k]))


def write_wl_files(items: Iterable[dict[str, Any]], folder: Path) -> None:
    aet_dir = folder / AET
    aet_dir.mkdir(parents=True, exist_ok=True)
    (aet_dir / "lockfile").touch()
    for n, item in enumerate(items):
        (aet_dir / f"item{n:07d}.wl").write_bytes(_encode(item))


# -- servers and client --------------------------------------------------------------------------------


def dcmtk(tool: str) -> str:
    for candidate in (f"/usr/bin/{tool}", shutil.which(tool)):
        if candidate and Path(candidate).exists() and "pyenv" not in candidate:
            return candidate
    raise SystemExit(f"dcmtk {tool} not found")


def accession_query(accession: str) -> Dataset:
    ds = Dataset()
    ds.PatientName = ""
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.AccessionNumber = accession
    ds.RequestedProcedureID = ""
    ds.StudyInstanceUID = ""
    ds.RequestedProcedureDescription = ""
    step = Dataset()
    step.ScheduledStationAETitle = ""
    step.ScheduledProcedureStepStartDate = ""
    step.ScheduledProcedureStepStartTime = ""
    step.Modality = ""
    step.ScheduledProcedureStepDescription = ""
    step.ScheduledProcedureStepID = ""
    ds.ScheduledProcedureStepSequence = [step]
    return ds


def station_day_query(station: str, date: str) -> Dataset:
    ds = accession_query("")
    step = ds.ScheduledProcedureStepSequence[0]
    step.ScheduledStationAETitle = station
    step.ScheduledProcedureStepStartDate = date
    return ds


class Client:
    """One association, TCP_NODELAY on the SCU's socket too."""

    def __init__(self, port: int) -> None:
        ae = AE(ae_title="BENCHSCU")
        ae.add_requested_context(ModalityWorklistInformationFind)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
        self.assoc = ae.associate("127.0.0.1", port, ae_title=AET)
        if not self.assoc.is_established:
            raise RuntimeError(f"association to port {port} failed")
        set_nodelay(self.assoc.dul.socket.socket)  # type: ignore[union-attr]

    def find(self, query: Dataset) -> tuple[float, int]:
        t0 = time.perf_counter()
        answers = 0
        for status, _identifier in self.assoc.send_c_find(query, ModalityWorklistInformationFind):
            if status is None or status.Status not in (0xFF00, 0xFF01, 0x0000):
                raise RuntimeError(f"C-FIND failed: {status}")
            if status.Status in (0xFF00, 0xFF01):
                answers += 1
        return time.perf_counter() - t0, answers

    def close(self) -> None:
        self.assoc.release()


def timed(port: int, queries: list[Dataset]) -> tuple[list[float], list[int]]:
    client = Client(port)
    try:
        client.find(queries[0])  # warm-up (imports, caches, first page of the index)
        results = [client.find(q) for q in queries]
    finally:
        client.close()
    return [r[0] for r in results], [r[1] for r in results]


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def p90_ms(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000


# -- one size --------------------------------------------------------------------------------------------


def fill_store(engine: Engine, items: list[dict[str, Any]]) -> None:
    WorklistItem.__table__.drop(engine, checkfirst=True)  # type: ignore[attr-defined]
    WorklistItem.__table__.create(engine)  # type: ignore[attr-defined]
    for start in range(0, len(items), 5000):
        with engine.begin() as conn:
            insert_many(conn, items[start : start + 5000], channel="bench")


def run_size(size: int, args: argparse.Namespace, workdir: Path, say: Callable[[str], None]) -> list[dict[str, Any]]:
    folder = workdir / f"n{size}"
    folder.mkdir(parents=True, exist_ok=True)
    items = make_items(size)
    t0 = time.perf_counter()
    engine = make_engine(args.db_url or sqlite_url_for(folder / "engine.db"))
    fill_store(engine, items)
    say(f"{size:,} items: store filled in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    wl_dir = folder / "wlm"
    shutil.rmtree(wl_dir, ignore_errors=True)
    write_wl_files(items, wl_dir)
    say(f"{size:,} items: .wl files written in {time.perf_counter() - t0:.1f} s")

    rnd = random.Random(size)
    picks = [items[rnd.randrange(size)] for _ in range(args.repeats)]
    acc_queries = [accession_query(i["AccessionNumber"]) for i in picks]
    day_queries = [station_day_query(rnd.choice(STATIONS), day(rnd.randrange(DAYS))) for _ in range(args.repeats)]
    wlm_n = args.repeats if size <= 10_000 else max(1, args.wlm_repeats_large)

    # the engine's SCP runs in a process of its own, as wlmscpfs does (and as in production):
    # sharing the client's GIL would add the client's own work to the server's latency
    engine_port = free_port()
    scp = subprocess.Popen(
        [sys.executable, __file__, "--serve", args.db_url or sqlite_url_for(folder / "engine.db"), str(engine_port)]
    )
    wlm_port = free_port()
    wlm = subprocess.Popen(
        [dcmtk("wlmscpfs"), "-q", "-dfp", str(wl_dir), "-dfr", str(wlm_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows = []
    try:
        wait_port(wlm_port)
        wait_port(engine_port)
        for shape, queries in (("one accession", acc_queries), ("one station's day", day_queries)):
            eng_t, eng_n = timed(engine_port, queries)
            say(f"{size:,} items, {shape}: engine done, wlmscpfs ({wlm_n} queries)...")
            wlm_t, wlm_n_answers = timed(wlm_port, queries[:wlm_n])
            if eng_n[:wlm_n] != wlm_n_answers:
                raise SystemExit(f"answer counts differ for {shape}: engine {eng_n[:wlm_n]} wlmscpfs {wlm_n_answers}")
            rows.append(
                {
                    "size": size,
                    "shape": shape,
                    "answers": statistics.median(eng_n),
                    "engine_ms": median_ms(eng_t),
                    "engine_p90": p90_ms(eng_t),
                    "engine_n": len(eng_t),
                    "wlm_ms": median_ms(wlm_t),
                    "wlm_n": len(wlm_t),
                }
            )
    finally:
        scp.terminate()
        scp.wait(10)
        wlm.terminate()
        wlm.wait(10)
        engine.dispose()
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        Console = None  # type: ignore[assignment,misc]  # noqa: N806
    headers = [
        "items",
        "query",
        "answers",
        "engine median ms",
        "engine p90 ms",
        "wlmscpfs median ms",
        "wlmscpfs/engine",
    ]
    lines = [
        [
            f"{r['size']:,}",
            r["shape"],
            f"{r['answers']:.0f}",
            f"{r['engine_ms']:.2f} (n={r['engine_n']})",
            f"{r['engine_p90']:.2f}",
            f"{r['wlm_ms']:.1f} (n={r['wlm_n']})",
            f"{r['wlm_ms'] / r['engine_ms']:.0f}x",
        ]
        for r in rows
    ]
    if Console is not None:
        table = Table(title="Worklist C-FIND latency (one established association, TCP_NODELAY)")
        for h in headers:
            table.add_column(h, justify="right" if h != "query" else "left")
        for line in lines:
            table.add_row(*line)
        Console(width=160).print(table)
    else:
        print(" | ".join(headers))
        for line in lines:
            print(" | ".join(line))


def check_targets(rows: list[dict[str, Any]]) -> bool:
    acc = {r["size"]: r for r in rows if r["shape"] == "one accession"}
    ok = True
    if 10_000 in acc:
        ratio = acc[10_000]["wlm_ms"] / acc[10_000]["engine_ms"]
        good = ratio >= 20
        ok &= good
        print(f"target: accession at 10,000 >= 20x faster than wlmscpfs: {ratio:.0f}x {'PASS' if good else 'FAIL'}")
    if 10_000 in acc and 100_000 in acc:
        growth = acc[100_000]["engine_ms"] / acc[10_000]["engine_ms"]
        good = growth <= 2
        ok &= good
        print(f"target: accession latency 100,000 vs 10,000 within 2x: {growth:.2f}x {'PASS' if good else 'FAIL'}")
    return ok


def serve(url: str, port: int) -> None:
    """Child process: the engine's DICOM application (C-ECHO + MWL) on the benchmark's store until terminated."""
    scp = DicomApplication(AET, "127.0.0.1", port, [EchoService(), WorklistService(make_engine(url))])
    scp.start()
    signal.signal(signal.SIGTERM, lambda *_: (scp.stop(), sys.exit(0)))
    while True:
        time.sleep(3600)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--repeats", type=int, default=25, help="queries per shape and server (>= 20)")
    ap.add_argument("--wlm-repeats-large", type=int, default=5, help="wlmscpfs queries per shape above 10,000")
    ap.add_argument("--db-url", default="", help="store URL (default: a SQLite file in the work folder)")
    ap.add_argument("--workdir", default="", help="where databases and .wl files go (default: a temp folder)")
    args = ap.parse_args()
    quiet_pynetdicom()

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="wl-bench-")
        workdir = Path(tmp.name)
    try:
        rows: list[dict[str, Any]] = []
        for size in args.sizes:
            rows += run_size(size, args, workdir, say)
        print_table(rows)
        ok = check_targets(rows)
    finally:
        if tmp is not None:
            tmp.cleanup()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
