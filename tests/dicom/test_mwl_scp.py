"""The worklist service in the DICOM application, over real sockets: pynetdicom SCU and dcmtk's findscu/echoscu."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification  # type: ignore[attr-defined]
from sqlalchemy import Engine
from wl_helpers import make_item

from engine.dicom.scp import DicomApplication, ServiceContext
from engine.dicom.services import DEFAULT_SERVICES, default_registry
from engine.store.worklist import insert_item, insert_many, set_status


def dcmtk(tool: str) -> str:
    """dcmtk's binary (pynetdicom ships python apps with the same names earlier on PATH)."""
    for candidate in (f"/usr/bin/{tool}", shutil.which(tool)):
        if candidate and Path(candidate).exists() and "pyenv" not in candidate:
            return candidate
    pytest.skip(f"dcmtk {tool} not installed")


def mwl_app(db: Engine, *, allowed_callers: list[str] | None = None, **settings: Any) -> DicomApplication:
    """The application as the engine builds it (C-ECHO + MWL), on an ephemeral port; not started."""
    services = default_registry().build(DEFAULT_SERVICES, ServiceContext(db, settings))
    return DicomApplication("ENGINE", "127.0.0.1", 0, services, allowed_callers=allowed_callers)


@pytest.fixture
def filled(sqlite_engine: Engine) -> Engine:
    with sqlite_engine.begin() as conn:
        for n in range(30):
            station = ("CT1", "CT2", "MR1")[n % 3]
            insert_item(
                conn,
                make_item(
                    PatientName=f"Patient{n:02d}^Test",
                    PatientID=f"P{n}",
                    AccessionNumber=f"ACC{n:02d}",
                    sps={
                        "ScheduledStationAETitle": station,
                        "Modality": station[:2],
                        "ScheduledProcedureStepStartDate": f"202611{20 + n % 10:02d}",
                        "ScheduledProcedureStepStartTime": f"{8 + n % 8:02d}0000",
                    },
                ),
            )
        insert_item(conn, make_item(PatientName="Müller^Jürgen", PatientID="PM", AccessionNumber="ACCM"))
        insert_item(conn, make_item(PatientName="Yamada^Tarou=山田^太郎", PatientID="PY", AccessionNumber="ACCY"))
        cancelled = insert_item(conn, make_item(PatientName="Gone^Ann", AccessionNumber="ACCX"))
        set_status(conn, cancelled, "CANCELLED")
    return sqlite_engine


@pytest.fixture
def scp(filled: Engine) -> Iterator[DicomApplication]:
    server = mwl_app(filled)
    server.start()
    yield server
    server.stop()


def ident(sps: dict[str, str] | None = None, **top: str) -> Dataset:
    ds = Dataset()
    ds.PatientName = ""
    ds.PatientID = ""
    ds.AccessionNumber = ""
    for k, v in top.items():
        setattr(ds, k, v)
    step = Dataset()
    for k in ("ScheduledStationAETitle", "ScheduledProcedureStepStartDate", "Modality"):
        setattr(step, k, "")
    step.ScheduledProcedureStepStartTime = ""
    for k, v in (sps or {}).items():
        setattr(step, k, v)
    ds.ScheduledProcedureStepSequence = [step]
    return ds


def scu_find(port: int, query: Dataset, *, calling: str = "TESTSCU") -> tuple[list[Dataset], int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="ENGINE")
    assert assoc.is_established
    answers: list[Dataset] = []
    final = -1
    try:
        for status, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind):
            assert status is not None
            if status.Status in (0xFF00, 0xFF01):
                answers.append(identifier)
            else:
                final = status.Status
    finally:
        assoc.release()
    return answers, final


def test_broad_query(scp: DicomApplication) -> None:
    ct1_week = {"ScheduledStationAETitle": "CT1", "ScheduledProcedureStepStartDate": "20261120-20261125"}
    answers, status = scu_find(scp.port, ident(sps=ct1_week))
    assert status == 0x0000
    assert answers and all(a.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "CT1" for a in answers)
    dates = {a.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate for a in answers}
    assert all("20261120" <= d <= "20261125" for d in dates)
    assert len(answers) == 8  # n in {0, 3, 12, 15, 21, 24} + the two named items (CT1, 25 Nov)


def test_patient_query_returns_every_key(scp: DicomApplication) -> None:
    query = ident(AccessionNumber="ACC07", RequestedProcedureID="", PatientBirthDate="", AdmissionID="")
    answers, status = scu_find(scp.port, query)
    assert status == 0
    assert len(answers) == 1
    a = answers[0]
    assert a.PatientID == "P7" and a.RequestedProcedureID == "RP1" and a.PatientBirthDate == "19700101"
    assert "AdmissionID" in a and a.AdmissionID == ""
    assert a.ScheduledProcedureStepSequence[0].Modality == "CT"


def test_wildcard_and_cancelled_items(scp: DicomApplication) -> None:
    answers, _ = scu_find(scp.port, ident(PatientName="patient0*"))
    assert sorted(a.PatientID for a in answers) == [f"P{n}" for n in range(10)]
    answers, _ = scu_find(scp.port, ident(AccessionNumber="ACCX"))
    assert answers == []


def test_utf8_names_are_returned_with_iso_ir_192(scp: DicomApplication) -> None:
    query = ident(PatientName="MÜLLER*", SpecificCharacterSet="ISO_IR 192")
    answers, _ = scu_find(scp.port, query)
    assert len(answers) == 1
    assert answers[0].SpecificCharacterSet == "ISO_IR 192"
    assert str(answers[0].PatientName) == "Müller^Jürgen"
    answers, _ = scu_find(scp.port, ident(PatientID="PY"))
    assert answers[0].SpecificCharacterSet == "ISO_IR 192"
    assert str(answers[0].PatientName).startswith("Yamada^Tarou=山田^太郎")


def test_latin1_query_gets_latin1_answer(scp: DicomApplication) -> None:
    answers, _ = scu_find(scp.port, ident(PatientID="PM", SpecificCharacterSet="ISO_IR 100"))
    assert answers[0].SpecificCharacterSet == "ISO_IR 100"
    assert str(answers[0].PatientName) == "Müller^Jürgen"


def test_top_level_keys_and_station_from_caller(filled: Engine) -> None:
    server = mwl_app(filled, station_from_caller=True)
    server.start()
    try:
        answers, _ = scu_find(server.port, ident(), calling="MR1")
        assert answers and {a.ScheduledProcedureStepSequence[0].ScheduledStationAETitle for a in answers} == {"MR1"}
        top = ident(Modality="CT", ScheduledStationAETitle="CT2")
        answers, _ = scu_find(server.port, top, calling="MR1")
        assert answers and all(a.Modality == "CT" and a.ScheduledStationAETitle == "CT2" for a in answers)
    finally:
        server.stop()


def test_c_echo(scp: DicomApplication) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="ENGINE")
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0
    done = subprocess.run([dcmtk("echoscu"), "-aec", "ENGINE", "127.0.0.1", str(scp.port)], capture_output=True)
    assert done.returncode == 0, done.stderr


def test_malformed_identifier_gets_failure_status(scp: DicomApplication) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad_date = ident(sps={"ScheduledProcedureStepStartDate": "2026-11-25"})
    answers, status = scu_find(scp.port, bad_date)
    assert answers == [] and status == 0xA900
    two_items = ident()
    two_items.ScheduledProcedureStepSequence.append(Dataset())
    answers, status = scu_find(scp.port, two_items)
    assert answers == [] and status == 0xA900


def test_allowed_callers(filled: Engine) -> None:
    server = mwl_app(filled, allowed_callers=["CT1"])
    server.start()
    try:
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(ModalityWorklistInformationFind)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="ENGINE")
        assert not assoc.is_established
        answers, status = scu_find(server.port, ident(AccessionNumber="ACC01"), calling="CT1")
        assert status == 0 and len(answers) == 1
    finally:
        server.stop()


def test_database_failure_gets_unable_to_process(filled: Engine) -> None:
    from sqlalchemy import text

    with filled.begin() as conn:
        conn.execute(text("DROP TABLE worklist_items"))
    server = mwl_app(filled)
    server.start()
    try:
        answers, status = scu_find(server.port, ident(AccessionNumber="ACC01"))
        assert answers == [] and 0xC000 <= status <= 0xCFFF
    finally:
        server.stop()


@pytest.fixture
def big_scp(sqlite_engine: Engine) -> Iterator[DicomApplication]:
    """Enough answers that a cancel surely arrives before the last one."""
    with sqlite_engine.begin() as conn:
        insert_many(conn, [make_item(PatientID=f"C{n}", AccessionNumber=f"C{n}") for n in range(3000)])
    server = mwl_app(sqlite_engine)
    server.start()
    yield server
    server.stop()


def test_cancel_is_handled_cleanly(big_scp: DicomApplication) -> None:
    # This SCU shares the process (and the GIL) with the SCP, which can therefore queue all its
    # answers before the cancel is even sent; that the cancel stops the answers is shown by the
    # out-of-process findscu test below. Here: either outcome is clean, and the association
    # keeps working afterwards.
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", big_scp.port, ae_title="ENGINE")
    assert assoc.is_established
    answers, final = 0, -1
    for status, _identifier in assoc.send_c_find(ident(), ModalityWorklistInformationFind, msg_id=7):
        if status.Status == 0xFF00:
            answers += 1
            if answers == 1:
                assoc.send_c_cancel(7, query_model=ModalityWorklistInformationFind)
        else:
            final = status.Status
    assert (final == 0xFE00 and 1 <= answers < 3000) or (final == 0x0000 and answers == 3000)
    again = [s.Status for s, _ in assoc.send_c_find(ident(PatientID="C7"), ModalityWorklistInformationFind)]
    assoc.release()
    assert again == [0xFF00, 0x0000]


# -- dcmtk findscu ------------------------------------------------------------------------------------


def findscu(port: int, keys: list[str], out: Path, *extra: str) -> tuple[list[Any], subprocess.CompletedProcess[bytes]]:
    out.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("findscu"), "-W", "-aet", "FINDSCU", "-aec", "ENGINE", "-X", "-od", str(out), *extra]
    for k in keys:
        args += ["-k", k]
    done = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, timeout=30)
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))], done


SPS_RETURN = [
    "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepSequence[0].Modality",
]


def test_findscu_broad_query(scp: DicomApplication, tmp_path: Path) -> None:
    keys = ["PatientName", "PatientID", "AccessionNumber", *SPS_RETURN]
    keys += ["ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20261121-20261122"]
    rsps, done = findscu(scp.port, keys, tmp_path / "broad")
    assert done.returncode == 0, done.stderr
    assert sorted(r.PatientID for r in rsps) == ["P1", "P11", "P12", "P2", "P21", "P22"]
    assert all(
        r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate in ("20261121", "20261122") for r in rsps
    )


def test_findscu_patient_query_and_wildcard(scp: DicomApplication, tmp_path: Path) -> None:
    rsps, done = findscu(
        scp.port, ["PatientName=PATIENT1*", "PatientID", "AccessionNumber", *SPS_RETURN], tmp_path / "p"
    )
    assert done.returncode == 0, done.stderr
    assert sorted(r.PatientID for r in rsps) == sorted(f"P{n}" for n in range(10, 20))
    rsps, _ = findscu(scp.port, ["AccessionNumber=ACC05", "PatientName", "StudyInstanceUID"], tmp_path / "a")
    assert len(rsps) == 1 and str(rsps[0].PatientName) == "Patient05^Test"


def test_findscu_time_range_and_utf8(scp: DicomApplication, tmp_path: Path) -> None:
    keys = ["PatientID", "SpecificCharacterSet=ISO_IR 192", "PatientName=Yamada*"]
    rsps, done = findscu(scp.port, keys, tmp_path / "u")
    assert done.returncode == 0, done.stderr
    assert len(rsps) == 1 and rsps[0].SpecificCharacterSet == "ISO_IR 192"
    assert "山田" in str(rsps[0].PatientName)
    keys = ["PatientID", "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime=1400-1600"]
    rsps, _ = findscu(scp.port, keys, tmp_path / "t")
    assert rsps and all(
        "140000" <= r.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime <= "160000" for r in rsps
    )


def test_findscu_cancel(big_scp: DicomApplication, tmp_path: Path) -> None:
    counts = []
    for attempt in range(5):  # the SCP may have sent every answer before the cancel arrives
        rsps, done = findscu(big_scp.port, ["PatientID"], tmp_path / f"c{attempt}", "--cancel", "1")
        assert done.returncode == 0, done.stderr
        counts.append(len(rsps))
        assert 1 <= len(rsps) <= 3000
        if len(rsps) < 3000:
            break
    assert min(counts) < 3000, counts
