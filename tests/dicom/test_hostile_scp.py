"""Hostile callers and faults at the DICOM application, over real sockets (issue 11): slots and
eviction, called/calling AE checks, undecodable and empty C-FIND identifiers, TLS."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification  # type: ignore[attr-defined]
from sqlalchemy import Engine
from wl_helpers import make_item

from engine.dicom.scp import DicomApplication, DicomTimeouts, ServiceContext, ae_title_key
from engine.dicom.services import DEFAULT_SERVICES, default_registry
from engine.dicom.slots import AssociationSlots, SlotRefused
from engine.hl7.mllp import client_ssl_context, server_ssl_context
from engine.store.worklist import insert_item

MWL = ModalityWorklistInformationFind


def app_for(db: Engine, **options: Any) -> DicomApplication:
    services = default_registry().build(DEFAULT_SERVICES, ServiceContext(db, {}))
    return DicomApplication("ENGINE", "127.0.0.1", 0, services, **options)


@pytest.fixture
def db(sqlite_engine: Engine) -> Engine:
    with sqlite_engine.begin() as conn:
        for n in range(3):
            insert_item(conn, make_item(PatientName=f"Test^P{n}", PatientID=f"P{n}", AccessionNumber=f"ACC{n}"))
    return sqlite_engine


@pytest.fixture
def started() -> Iterator[Callable[[DicomApplication], DicomApplication]]:
    apps: list[DicomApplication] = []

    def start(app: DicomApplication) -> DicomApplication:
        app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop()


def scu(calling: str = "MODALITY1", **tls: Any) -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(MWL)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def associate(port: int, calling: str = "MODALITY1", called: str = "ENGINE", tls: ssl.SSLContext | None = None) -> Any:
    ae = scu(calling)
    tls_args = (tls, "localhost") if tls is not None else None
    return ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)


def rejection(assoc: Any) -> tuple[int, int, int]:
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    return rj.result, rj.result_source, rj.diagnostic


def wait_for(condition: Callable[[], bool], what: str, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.02)


def mwl_query(accession: str = "") -> Dataset:
    ds = Dataset()
    ds.PatientName = ""
    ds.AccessionNumber = accession
    return ds


# -- slots ----------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_slots_displace_the_idlest_and_never_a_busy_one() -> None:
    clock = Clock()
    slots = AssociationSlots(3, 3, clock)
    for name in ("a", "b", "c"):
        assert slots.admit(name, name.upper()) == []
        clock.now += 10
    slots.begin("a")  # a is inside a C-FIND: not displaceable although admitted first
    gone = slots.admit("d", "D")
    assert [(g.key, g.caller, g.idle_seconds) for g in gone] == [("b", "B", 20.0)]
    slots.begin("c")
    slots.begin("d")
    with pytest.raises(SlotRefused):
        slots.admit("e", "E")
    assert len(slots) == 3
    slots.end("a")
    assert [g.key for g in slots.admit("e", "E")] == ["a"]
    slots.leave("e")
    assert len(slots) == 2


def test_slots_cap_per_caller_displaces_the_callers_own() -> None:
    clock = Clock()
    slots = AssociationSlots(10, 2, clock)
    slots.admit("other", "CT1")
    clock.now += 1
    slots.admit("m1", "MR1")
    clock.now += 1
    slots.admit("m2", "MR1")
    clock.now += 1
    assert [g.key for g in slots.admit("m3", "MR1")] == ["m1"]  # not "other", idle longer
    assert slots.holders("MR1") == 2
    slots.begin("m2")
    slots.begin("m3")
    with pytest.raises(SlotRefused):
        slots.admit("m4", "MR1")
    assert slots.holders("MR1") == 2 and len(slots) == 3


def test_an_idle_crowd_does_not_lock_a_modality_out(
    db: Engine, started: Callable[[DicomApplication], DicomApplication], caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's case: every slot held by callers that C-ECHO now and then; a new caller still gets in."""
    app = started(app_for(db, max_associations=4, max_associations_per_caller=4))
    crowd = [associate(app.port, f"CROWD{n}") for n in range(4)]
    assert all(a.is_established for a in crowd)
    for a in crowd[1:]:  # all but CROWD0 were active recently
        assert a.send_c_echo().Status == 0
    with caplog.at_level(logging.WARNING, logger="engine.dicom.scp"):
        modality = associate(app.port, "MODALITY1")
        assert modality.is_established
        answers = [s.Status for s, _ in modality.send_c_find(mwl_query("ACC1"), MWL)]
        assert answers == [0xFF00, 0x0000]
        wait_for(lambda: crowd[0].is_aborted, "the idlest association is aborted")
    assert all(a.is_established for a in crowd[1:])
    line = next(r.getMessage() for r in caplog.records if "aborted to admit" in r.getMessage())
    assert "'CROWD0'" in line and "'MODALITY1'" in line and " idle " in line
    modality.release()
    for a in crowd[1:]:
        a.release()


def test_per_caller_cap_takes_the_callers_own_idlest(
    db: Engine, started: Callable[[DicomApplication], DicomApplication]
) -> None:
    app = started(app_for(db, max_associations=8, max_associations_per_caller=2))
    other = associate(app.port, "CT1")
    first = associate(app.port, "MR1")
    second = associate(app.port, "MR1")
    assert second.send_c_echo().Status == 0
    third = associate(app.port, "MR1")
    assert third.is_established
    wait_for(lambda: first.is_aborted, "MR1's idlest association is aborted")
    assert other.is_established and second.is_established
    assert other.send_c_echo().Status == 0
    for a in (other, second, third):
        a.release()


def test_idle_timeout_closes_a_silent_association(
    db: Engine, started: Callable[[DicomApplication], DicomApplication]
) -> None:
    app = started(app_for(db, timeouts=DicomTimeouts(network=1.0)))
    silent = associate(app.port)
    assert silent.is_established
    wait_for(lambda: not silent.is_established, "the SCP closes the silent association")
    wait_for(lambda: len(app.slots) == 0, "its slot is free again")


def test_timeouts_reach_pynetdicom(db: Engine, started: Callable[[DicomApplication], DicomApplication]) -> None:
    app = started(app_for(db, timeouts=DicomTimeouts(network=600.0, acse=7.0, dimse=9.0)))
    ae = app._ae
    assert ae is not None
    assert (ae.network_timeout, ae.acse_timeout, ae.dimse_timeout) == (600.0, 7.0, 9.0)


# -- AE titles ------------------------------------------------------------------------------------
def test_wrong_called_ae_is_rejected(db: Engine, started: Callable[[DicomApplication], DicomApplication]) -> None:
    app = started(app_for(db))
    assert rejection(associate(app.port, called="ANY-SCP")) == (0x01, 0x01, 0x07)
    assert rejection(associate(app.port, called="engine")) == (0x01, 0x01, 0x07)  # AE titles are case-sensitive
    ok = associate(app.port, called="ENGINE ")
    assert ok.is_established
    ok.release()
    assert len(app.slots) <= 1  # rejected callers never took a slot


def test_called_ae_check_can_be_switched_off(
    db: Engine, started: Callable[[DicomApplication], DicomApplication]
) -> None:
    app = started(app_for(db, check_called_aet=False))
    assoc = associate(app.port, called="ANY-SCP")
    assert assoc.is_established
    assoc.release()


@pytest.mark.parametrize(
    ("calling", "admitted"),
    [("MODALITY1", True), ("MODALITY1 ", True), ("MODALITY1X", False), ("modality1", False), ("MODALITY", False)],
)
def test_allowlist_compares_exact_ae_titles(
    db: Engine, started: Callable[[DicomApplication], DicomApplication], calling: str, admitted: bool
) -> None:
    app = started(app_for(db, allowed_callers=["MODALITY1", " CT2 "]))
    assoc = associate(app.port, calling)
    if admitted:
        assert assoc.is_established
        assoc.release()
    else:
        assert rejection(assoc) == (0x01, 0x01, 0x03)


def test_allowlist_entries_lose_outer_spaces_only() -> None:
    assert ae_title_key("  CT2 ") == "CT2"
    assert ae_title_key("CT 2") == "CT 2"


def test_a_refused_caller_displaces_nobody(db: Engine, started: Callable[[DicomApplication], DicomApplication]) -> None:
    app = started(app_for(db, allowed_callers=["MODALITY1"], max_associations=1))
    held = associate(app.port, "MODALITY1")
    assert rejection(associate(app.port, "INTRUDER")) == (0x01, 0x01, 0x03)
    assert rejection(associate(app.port, "MODALITY1", called="OTHER")) == (0x01, 0x01, 0x07)
    assert held.is_established and held.send_c_echo().Status == 0
    held.release()


# -- C-FIND identifiers ---------------------------------------------------------------------------
def raw_find(assoc: Any, identifier: bytes | None) -> list[int]:
    """A C-FIND whose identifier is these bytes (None: no data set); the statuses answered."""
    assoc._reactor_checkpoint.clear()  # as pynetdicom's own send_c_find: the reactor must not take our answers
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        req = C_FIND()
        req.MessageID = 7
        req.AffectedSOPClassUID = MWL
        req.Priority = 2
        req.Identifier = BytesIO(identifier) if identifier is not None else None
        cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == MWL)
        assoc.dimse.send_msg(req, cx.context_id)
        statuses: list[int] = []
        while True:
            _cx, rsp = assoc.dimse.get_msg(block=True)
            assert rsp is not None, "no answer"
            statuses.append(int(rsp.Status))
            if rsp.Status not in (0xFF00, 0xFF01):
                return statuses
    finally:
        assoc._reactor_checkpoint.set()


@pytest.mark.parametrize(
    "garbage",
    [b"\xde\xad\xbe\xef" * 50, bytes(range(256)), b"\x10\x00\x10\x00\xff\x00\x00\x00ab", b"\x08\x00"],
    ids=["deadbeef", "bytes-0-255", "cut-value", "half-tag"],
)
def test_garbage_identifier_is_answered_unable_to_process(
    db: Engine, started: Callable[[DicomApplication], DicomApplication], garbage: bytes
) -> None:
    app = started(app_for(db))
    assoc = associate(app.port)
    assert raw_find(assoc, garbage) == [0xC000]
    assert [s.Status for s, _ in assoc.send_c_find(mwl_query("ACC2"), MWL)] == [0xFF00, 0x0000]  # still serving
    assoc.release()


def test_elements_out_of_order_are_not_a_dataset(
    db: Engine, started: Callable[[DicomApplication], DicomApplication]
) -> None:
    # (0010,0020) PatientID then (0008,0050) AccessionNumber: implicit VR LE, descending tags
    body = b"\x10\x00\x20\x00\x02\x00\x00\x00P1" + b"\x08\x00\x50\x00\x00\x00\x00\x00"
    app = started(app_for(db))
    assoc = associate(app.port)
    assert raw_find(assoc, body) == [0xC000]
    assoc.release()


@pytest.mark.parametrize(
    "identifier", [None, b"", b"\x08\x00\x05\x00\x0a\x00\x00\x00ISO_IR 100"], ids=["none", "zero", "charset-only"]
)
def test_empty_identifier_gets_a_failure(
    db: Engine, started: Callable[[DicomApplication], DicomApplication], identifier: bytes | None
) -> None:
    app = started(app_for(db))
    assoc = associate(app.port)
    if identifier == b"":  # a zero-length data set PDV after the command, as some SCUs send it
        statuses = raw_find_zero_length(assoc)
    else:
        statuses = raw_find(assoc, identifier)
    assert statuses == [0xA900]
    assoc.release()


def raw_find_zero_length(assoc: Any) -> list[int]:
    from pynetdicom.pdu_primitives import P_DATA

    original = assoc.dimse.send_msg

    def send_with_empty_dataset(primitive: Any, context_id: int) -> None:
        original(primitive, context_id)
        pdata = P_DATA()
        pdata.presentation_data_value_list.append([context_id, b"\x02"])  # data set, last fragment, no bytes
        assoc.dul.send_pdu(pdata)

    assoc.dimse.send_msg = send_with_empty_dataset
    try:
        return raw_find(assoc, b"")
    finally:
        assoc.dimse.send_msg = original


def test_a_valid_query_is_untouched(db: Engine, started: Callable[[DicomApplication], DicomApplication]) -> None:
    app = started(app_for(db))
    assoc = associate(app.port)
    answers = list(assoc.send_c_find(mwl_query(), MWL))
    assert [s.Status for s, _ in answers] == [0xFF00] * 3 + [0x0000]
    assoc.release()


# -- TLS ------------------------------------------------------------------------------------------
def tls_app(db: Engine, pki: Any, *, mutual: bool = False) -> DicomApplication:
    ctx = server_ssl_context(pki.p("server.crt"), pki.p("server.key"), pki.p("ca.crt"), require_client_cert=mutual)
    return app_for(db, tls=ctx, timeouts=DicomTimeouts(acse=5.0))


def test_tls_echo_and_find(db: Engine, started: Callable[[DicomApplication], DicomApplication], pki: Any) -> None:
    app = started(tls_app(db, pki))
    assoc = associate(app.port, tls=client_ssl_context(pki.p("ca.crt")))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assert [s.Status for s, _ in assoc.send_c_find(mwl_query("ACC0"), MWL)] == [0xFF00, 0x0000]
    assoc.release()


def refused(port: int, client: ssl.SSLContext | None) -> bool:
    """True when the listener ends the connection (handshake alert or close) instead of talking DICOM.

    Raw sockets, not a pynetdicom SCU: its requestor leaves the socket of a failed handshake open."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            if client is None:
                raw.sendall(b"\x01\x00" + b"\x00" * 72)  # the start of an A-ASSOCIATE-RQ, in clear text
                return raw.recv(1) == b""
            with client.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"\x01\x00" + b"\x00" * 72)
                return tls.recv(1) == b""  # TLS 1.3: a refused client certificate shows at the first read
        except (ssl.SSLError, ConnectionError):
            return True


def test_mutual_tls_needs_a_client_cert_from_the_ca(
    db: Engine, started: Callable[[DicomApplication], DicomApplication], pki: Any
) -> None:
    app = started(tls_app(db, pki, mutual=True))
    good = client_ssl_context(pki.p("ca.crt"), pki.p("client.crt"), pki.p("client.key"))
    assoc = associate(app.port, tls=good)
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    assert refused(app.port, client_ssl_context(pki.p("ca.crt")))
    assert refused(app.port, client_ssl_context(pki.p("ca.crt"), pki.p("rogue-client.crt"), pki.p("rogue-client.key")))
    wait_for(lambda: len(app.slots) == 0, "no slot held once the good caller released")


def test_plain_tcp_to_the_tls_port_gets_no_association(
    db: Engine, started: Callable[[DicomApplication], DicomApplication], pki: Any
) -> None:
    app = started(tls_app(db, pki))
    assert refused(app.port, None)


def test_a_silent_connection_does_not_stall_the_tls_listener(
    db: Engine, started: Callable[[DicomApplication], DicomApplication], pki: Any
) -> None:
    """The handshake runs in the connection's thread: a client that never says hello blocks nobody."""
    app = started(tls_app(db, pki))
    silent = [socket.create_connection(("127.0.0.1", app.port)) for _ in range(3)]
    try:
        assoc = associate(app.port, tls=client_ssl_context(pki.p("ca.crt")))
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        for s in silent:
            s.close()


def dcmtk(tool: str) -> str:
    path = Path(f"/usr/bin/{tool}")
    if not path.exists():
        pytest.skip(f"dcmtk {tool} not installed")
    if "--enable-tls" not in subprocess.run([str(path), "--help"], capture_output=True, text=True).stdout:
        pytest.skip(f"this dcmtk {tool} is built without TLS")
    return str(path)


def test_findscu_over_tls(
    db: Engine, started: Callable[[DicomApplication], DicomApplication], pki: Any, tmp_path: Path
) -> None:
    findscu = dcmtk("findscu")
    app = started(tls_app(db, pki, mutual=True))
    query = tmp_path / "q.dcm"
    ds = mwl_query("ACC1")
    ds.save_as(query, implicit_vr=False, little_endian=True)
    out = subprocess.run(
        [
            findscu,
            "-v",
            "-W",
            "-aet",
            "MODALITY1",
            "-aec",
            "ENGINE",
            "+tls",
            pki.p("client.key"),
            pki.p("client.crt"),
            "-pw",
            "+cf",
            pki.p("ca.crt"),
            "-od",
            str(tmp_path),
            "-X",
            "127.0.0.1",
            str(app.port),
            str(query),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(list(tmp_path.glob("rsp*.dcm"))) == 1


# -- from engine.yaml -----------------------------------------------------------------------------
async def test_engine_yaml_dicom_block_reaches_the_scp(tmp_path: Path, pki: Any) -> None:
    """`dicom.tls`, the slot limits, the called-AE check and the timeouts, as the running engine wires them."""
    import asyncio

    from engine.runtime.app import EngineApp, default_registry
    from engine.runtime.config import load_config

    (tmp_path / "channels").mkdir()
    (tmp_path / "mappings").mkdir()
    (tmp_path / "engine.yaml").write_text(
        f"""
storage: {{url: "sqlite:///{tmp_path / "engine.db"}"}}
dicom:
  port: 0
  ae_title: MWLSCP
  max_associations: 5
  max_associations_per_caller: 2
  idle_timeout_seconds: 120
  tls: {{cert: {pki.p("server.crt")}, key: {pki.p("server.key")}, ca: {pki.p("ca.crt")}, require_client_cert: true}}
"""
    )
    registry = default_registry()
    app = EngineApp(load_config(tmp_path / "engine.yaml", registry, env={}), registry)
    await app.start()
    try:
        scp = app.scp
        assert (scp.slots.max_associations, scp.slots.max_per_caller, scp.check_called_aet) == (5, 2, True)
        assert scp.timeouts.network == 120
        client = client_ssl_context(pki.p("ca.crt"), pki.p("client.crt"), pki.p("client.key"))

        def echo(called: str) -> Any:
            assoc = associate(scp.port, called=called, tls=client)
            if assoc.is_established:
                status = assoc.send_c_echo().Status
                assoc.release()
                return status
            return rejection(assoc)

        assert await asyncio.to_thread(echo, "MWLSCP") == 0
        assert await asyncio.to_thread(echo, "ENGINE") == (0x01, 0x01, 0x07)
    finally:
        await app.stop()


def test_require_client_cert_needs_a_ca() -> None:
    from pydantic import ValidationError

    from engine.runtime.config import DicomConfig

    with pytest.raises(ValidationError, match="needs ca"):
        DicomConfig.model_validate({"tls": {"cert": "a.crt", "key": "a.key", "require_client_cert": True}})
    with pytest.raises(ValidationError):
        DicomConfig.model_validate({"tls": {"cert": "a.crt", "key": "a.key", "verify": False}})
