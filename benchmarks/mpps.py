"""MPPS benchmark: modalities reporting steps to `engine run`, and the RIS getting the status.

    python benchmarks/mpps.py [--steps 300] [--associations 4] [--echoes 300] [--workdir DIR]

Pre-loads one scheduled worklist item per step into a fresh SQLite store, starts `engine run`
with the shipped configuration on free ports (the RIS status destination pointed at a small
MLLP listener of this script that answers AA), then, over `--associations` concurrent
associations (one pynetdicom SCU thread each, TCP_NODELAY on its socket, one request in flight):

- baseline: C-ECHO round trips on the same SCP (the DICOM floor: no store, no commit);
- MPPS: per step an N-CREATE IN PROGRESS and an N-SET COMPLETED (one series of 10 instances),
  each answered only after its commit (stored unit, step row, worklist status, queued ORM).

Prints requests/s and the median/p90 latency of each, the ratio C-ECHO/MPPS per request (what
storing and committing costs), and how long the RIS took to get every IP and CM message.
"""

from __future__ import annotations

import argparse
import os
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _load import free_port, wait_port  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification  # type: ignore[attr-defined]  # noqa: E402

from engine.dicom.scp import quiet_pynetdicom, set_nodelay  # noqa: E402
from engine.store.db import init_db, make_engine  # noqa: E402
from engine.store.worklist import insert_many  # noqa: E402

STUDY_ROOT = "1.2.826.0.1.3680043.8.498.77"


def items(count: int) -> list[dict[str, Any]]:
    return [
        {
            "PatientID": f"P{n:07d}",
            "IssuerOfPatientID": "HOSP",
            "PatientName": f"DOE{n % 97}^JANE",
            "AccessionNumber": f"A{n:08d}",
            "RequestedProcedureID": f"RP{n:08d}",
            "StudyInstanceUID": f"{STUDY_ROOT}.{n}",
            "PlacerOrderNumberImagingServiceRequest": f"PL{n:08d}",
            "FillerOrderNumberImagingServiceRequest": f"FL{n:08d}",
            "RequestedProcedureCodeSequence": [
                {"CodeValue": "CTHEAD", "CodingSchemeDesignator": "LOCAL", "CodeMeaning": "CT head"}
            ],
            "ScheduledProcedureStepSequence": [
                {"ScheduledStationAETitle": "CT1", "ScheduledProcedureStepStartDate": "20261125",
                 "ScheduledProcedureStepStartTime": "100000", "Modality": "CT",
                 "ScheduledProcedureStepID": f"S{n:08d}"}
            ],
        }
        for n in range(count)
    ]


def n_create(n: int) -> Dataset:
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"DOE{n % 97}^JANE", f"P{n:07d}", "", ""
    item = Dataset()
    item.StudyInstanceUID = f"{STUDY_ROOT}.{n}"
    item.ReferencedStudySequence = []
    item.AccessionNumber, item.RequestedProcedureID = f"A{n:08d}", f"RP{n:08d}"
    item.RequestedProcedureDescription, item.ScheduledProcedureStepID = "CT head", f"S{n:08d}"
    item.ScheduledProcedureStepDescription, item.ScheduledProtocolCodeSequence = "", []
    ds.ScheduledStepAttributesSequence = [item]
    ds.PerformedProcedureStepID, ds.PerformedStationAETitle = f"PPS{n}", "CT1"
    ds.PerformedStationName, ds.PerformedLocation = "", ""
    ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = "20261125", "101500"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription, ds.PerformedProcedureTypeDescription = "CT head", ""
    ds.ProcedureCodeSequence = []
    ds.PerformedProcedureStepEndDate, ds.PerformedProcedureStepEndTime = "", ""
    ds.Modality, ds.StudyID = "CT", ""
    ds.PerformedProtocolCodeSequence, ds.PerformedSeriesSequence = [], []
    return ds


def n_set(n: int) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedProcedureStepEndDate, ds.PerformedProcedureStepEndTime = "20261125", "103000"
    series = Dataset()
    series.PerformingPhysicianName, series.OperatorsName, series.ProtocolName = "", "", "Head"
    series.SeriesInstanceUID, series.SeriesDescription, series.RetrieveAETitle = f"{STUDY_ROOT}.{n}.1", "Axial", ""
    refs = []
    for i in range(10):
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ref.ReferencedSOPInstanceUID = f"{STUDY_ROOT}.{n}.1.{i}"
        refs.append(ref)
    series.ReferencedImageSequence, series.ReferencedNonImageCompositeSOPInstanceSequence = refs, []
    ds.PerformedSeriesSequence = [series]
    return ds


class Ris(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RisHandler)
        self.count = 0
        self.last = 0.0
        self.lock = threading.Lock()


class RisHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        buf = b""
        server = self.server
        assert isinstance(server, Ris)
        while chunk := self.request.recv(65536):
            buf += chunk
            while b"\x1c\x0d" in buf:
                frame, buf = buf.split(b"\x1c\x0d", 1)
                control = frame.lstrip(b"\x0b").split(b"\r", 1)[0].split(b"|")[9]
                with server.lock:
                    server.count += 1
                    server.last = time.perf_counter()
                ack = b"MSH|^~\\&|RIS||ENGINE||20260101||ACK|A1|P|2.5.1\rMSA|AA|" + control + b"\r"
                self.request.sendall(b"\x0b" + ack + b"\x1c\x0d")


def run_threads(target: Any, parts: list[list[int]]) -> tuple[float, list[float]]:
    latencies: list[float] = []
    errors: list[BaseException] = []

    def work(part: list[int]) -> None:
        try:
            latencies.extend(target(part))
        except BaseException as exc:  # reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in parts]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0, latencies


def associate(port: int, context: str) -> Any:
    ae = AE(ae_title="CT1")
    ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", port, ae_title="ENGINE")
    if not assoc.is_established:
        raise RuntimeError("association refused")
    # a request of two PDUs (command + dataset) would wait ~40 ms on Nagle + delayed ACK
    set_nodelay(assoc.dul.socket.socket)
    return assoc


def echoes(port: int, count: int) -> list[float]:
    assoc = associate(port, Verification)
    out = []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            status = assoc.send_c_echo()
            out.append(time.perf_counter() - t0)
            if status.Status != 0:
                raise RuntimeError(f"C-ECHO status 0x{status.Status:04X}")
    finally:
        assoc.release()
    return out


def steps(port: int, numbers: list[int]) -> list[float]:
    assoc = associate(port, ModalityPerformedProcedureStep)
    out = []
    try:
        for n in numbers:
            uid = f"1.2.826.0.1.3680043.8.497.77.{n}"
            for kind, ds in (("create", n_create(n)), ("set", n_set(n))):
                t0 = time.perf_counter()
                if kind == "create":
                    status, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
                else:
                    status, _ = assoc.send_n_set(ds, ModalityPerformedProcedureStep, uid)
                out.append(time.perf_counter() - t0)
                if status is None or status.Status != 0:
                    raise RuntimeError(f"MPPS status {status}")
    finally:
        assoc.release()
    return out


def figures(name: str, count: int, seconds: float, lat: list[float]) -> float:
    ordered = sorted(lat)
    rate = count / seconds
    p50, p90 = statistics.median(ordered) * 1000, ordered[int(0.9 * (len(ordered) - 1))] * 1000
    print(f"{name:<28} {count:>6} requests in {seconds:6.2f} s = {rate:8.1f}/s   p50 {p50:6.2f} ms   p90 {p90:6.2f} ms")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="performed steps (N-CREATE + N-SET each)")
    ap.add_argument("--associations", type=int, default=4, help="concurrent modalities, one request in flight each")
    ap.add_argument("--echoes", type=int, default=300, help="C-ECHO round trips per association (baseline)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    quiet_pynetdicom()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mpps-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{work / 'engine.db'}"
    db = make_engine(url)
    init_db(db)
    with db.begin() as conn:
        insert_many(conn, items(args.steps), channel="ris-orders")
    db.dispose()
    ris = Ris()
    threading.Thread(target=ris.serve_forever, daemon=True).start()
    dicom = free_port()
    env = dict(os.environ) | {
        "ENGINE_STORAGE_URL": url, "DICOM_PORT": str(dicom), "ORDERS_MLLP_PORT": str(free_port()),
        "RESULTS_MLLP_PORT": str(free_port()), "HTTP_PORT": "0", "RIS_STATUS_PORT": str(ris.server_address[1]),
        "ENGINE_LOG_LEVEL": "WARNING", "ORDERS_ARCHIVE_DIR": str(work / "archive"),
        "RESULTS_OUTBOX_DIR": str(work / "outbox"),
    }
    log = open(work / "engine.log", "wb")  # noqa: SIM115 - open for the engine's lifetime
    proc = subprocess.Popen([sys.executable, "-m", "engine", "run", "-c", str(ROOT / "engine.yaml")],
                            env=env, stdout=log, stderr=log)
    try:
        wait_port(dicom)
        k = args.associations
        print(f"engine run (SQLite, synchronous=FULL), {k} associations, {args.steps} steps, "
              f"{os.cpu_count()} CPUs")
        seconds, lat = run_threads(lambda p: echoes(dicom, len(p)), [list(range(args.echoes))] * k)
        echo_rate = figures("C-ECHO (baseline)", args.echoes * k, seconds, lat)
        parts = [list(range(args.steps))[i::k] for i in range(k)]
        t0 = time.perf_counter()
        seconds, lat = run_threads(lambda p: steps(dicom, p), parts)
        mpps_rate = figures("MPPS N-CREATE + N-SET", 2 * args.steps, seconds, lat)
        print(f"{'steps (create + complete)':<28} {args.steps / seconds:8.1f} steps/s")
        print(f"ratio C-ECHO/MPPS per request: {echo_rate / mpps_rate:.1f}x (the cost of storing and committing)")
        deadline = time.time() + 120
        while ris.count < 2 * args.steps and time.time() < deadline:
            time.sleep(0.05)
        took = ris.last - t0
        print(f"RIS got {ris.count} of {2 * args.steps} status messages (IP + CM), the last "
              f"{took:.2f} s after the first N-CREATE = {ris.count / took:.1f} messages/s")
    finally:
        proc.terminate()
        proc.wait(30)
        ris.shutdown()


if __name__ == "__main__":
    main()
