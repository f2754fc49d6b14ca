"""The pieces without a network: the dicom adapter's identity and view, the status message's
fields and escaping, the DIMSE status mapping, and the load-time checks of an MPPS channel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from engine.configfile import ConfigError
from engine.dicom.adapter import DicomAdapter, DicomOptions, DicomView, envelope
from engine.dicom.mpps import MPPS_SOP_CLASS
from engine.dicom.status import DicomAnswer, answer_for
from engine.errors import UNKNOWN_KEY_IDENTIFIER, ProcessingError
from engine.hl7.er7 import Message
from engine.hl7.status import Coded, OrderStatus, StatusFormat, build_status_message
from engine.runtime.app import default_registry
from engine.runtime.config import load_config
from tests.mpps.conftest import Order


def adapter() -> DicomAdapter:
    return DicomAdapter(DicomOptions())


def test_control_ids_per_command() -> None:
    order = Order()
    uid = order.mpps_uid()
    create = adapter().parse(envelope("N-CREATE", MPPS_SOP_CLASS, uid, "CT1", "ENGINE", order.n_create()))
    assert (create.message_type, create.control_id, create.sender) == ("MPPS^N-CREATE", uid, "CT1")
    assert create.patient_id == order.patient
    one = adapter().parse(envelope("N-SET", MPPS_SOP_CLASS, uid, "CT1", "ENGINE", order.completed()))
    same = adapter().parse(envelope("N-SET", MPPS_SOP_CLASS, uid, "CT1", "ENGINE", order.completed()))
    other = adapter().parse(envelope("N-SET", MPPS_SOP_CLASS, uid, "CT1", "ENGINE", order.completed(series=1)))
    assert one.control_id == same.control_id != other.control_id
    assert one.control_id.startswith(uid + "#")
    study = Dataset()
    study.StudyInstanceUID, study.NumberOfStudyRelatedInstances = order.study_uid, 12
    found = adapter().parse(envelope("FOUND", "", order.study_uid, "", "ENGINE", study))
    assert (found.message_type, found.control_id) == ("STUDY^FOUND", f"{order.study_uid}#12")


def test_view_reads_keyword_paths_and_the_envelope() -> None:
    order = Order()
    unit = adapter().parse(envelope("N-CREATE", MPPS_SOP_CLASS, order.mpps_uid(), "CT1", "ENGINE", order.n_create()))
    view = unit.view
    assert isinstance(view, DicomView)
    assert view.get("ScheduledStepAttributesSequence[0].AccessionNumber") == order.accession
    assert view.get("ScheduledStepAttributesSequence[1].AccessionNumber") == ""
    assert view.get("PatientName") == "Doe^Jane^Anne^^Mrs"
    assert view.get("command") == "N-CREATE" and view.get("calling_aet") == "CT1"
    assert view.get("NoSuchKeyword") == "" and view.get("ProcedureCodeSequence") == ""
    assert "Doe" not in repr(view)


def test_unparseable_units_are_refused_with_processing_failure() -> None:
    for raw in (b"\xff\xfe", b"[1, 2]", b'{"command": "N-CREATE", "dataset": {"00100010": 5}}'):
        with pytest.raises(ProcessingError):
            adapter().parse(raw)
    builder, _ = adapter().refusal(b"")
    answer = DicomAnswer.from_json(builder("error", ProcessingError("not a DICOM unit"), []))
    assert answer.status == 0x0110


def test_refusals_map_to_dimse_statuses() -> None:
    assert answer_for(None).status == 0
    assert answer_for(ProcessingError("x", UNKNOWN_KEY_IDENTIFIER)).status == 0x0112
    assert answer_for(ProcessingError("x")).status == 0x0110
    assert DicomAnswer.from_json("garbage").status == 0x0110
    stored = DicomAnswer(0x0110, "c" * 100, 0xA710, ["00400252"]).to_json()
    back = DicomAnswer.from_json(stored)
    assert (back.status, len(back.comment), back.error_id, back.tags) == (0x0110, 64, 0xA710, ["00400252"])


def test_type2_absences_are_warnings_not_refusals() -> None:
    order = Order()
    ds = order.n_create(PerformedLocation=None, StudyID=None)
    unit = adapter().parse(envelope("N-CREATE", MPPS_SOP_CLASS, order.mpps_uid(), "CT1", "ENGINE", ds))
    adapter().check(unit)  # not refused
    assert {w.location for w in unit.warnings} == {"PerformedLocation", "StudyID"}


def test_status_message_fields_and_escaping() -> None:
    status = OrderStatus(
        order_status="DC",
        placer_order="PL|1",
        filler_order="FL^1",
        accession_number="A&1",
        patient_id="P1",
        patient_issuer="HOSP",
        patient_name="O'Neil^Mary^Ann^Dr^Jr",
        procedure=Coded("CTH", "CT head ~ plain", "LOCAL"),
        reason=Coded("110514", "Incorrect worklist entry", "DCM"),
    )
    text = build_status_message(status, StatusFormat(accession_field="OBR-20"))
    msg = Message.parse(text.encode())
    assert msg.message_type == "ORM^O01"
    assert (msg.get("ORC-1"), msg.get("ORC-5")) == ("SC", "DC")
    assert msg.get("ORC-2") == "PL|1" and msg.get("OBR-2") == "PL|1"
    assert msg.get("ORC-3") == "FL^1" and msg.get("OBR-3") == "FL^1"
    assert msg.get("OBR-20") == "A&1" and msg.get("OBR-18") == ""
    assert msg.get("OBR-4.2") == "CT head ~ plain"
    assert msg.get("PID-3.1") == "P1" and msg.get("PID-3.4") == "HOSP"
    assert (msg.get("PID-5.1"), msg.get("PID-5.4"), msg.get("PID-5.5")) == ("O'Neil", "Jr", "Dr")
    assert msg.get("ORC-16.1") == "110514"
    second = Message.parse(build_status_message(status, StatusFormat()).encode())
    assert second.control_id != msg.control_id and len(msg.control_id) <= 20
    omi = Message.parse(build_status_message(status, StatusFormat(message="OMI^O23")).encode())
    assert omi.message_type == "OMI^O23" and omi.get("IPC-1") == "A&1"


def _config(tmp_path: Path, channels: dict[str, str]) -> Path:
    (tmp_path / "channels").mkdir()
    (tmp_path / "mappings").mkdir()
    (tmp_path / "engine.yaml").write_text(f"storage:\n  url: sqlite:///{tmp_path / 'e.db'}\n")
    for name, text in channels.items():
        (tmp_path / "channels" / f"{name}.yaml").write_text(text)
    return tmp_path / "engine.yaml"


MPPS_CHANNEL = """\
name: {name}
source: {{type: dicom}}
accept: [MPPS^N-CREATE, MPPS^N-SET]
destinations:
  - {{name: steps, type: steps, status_to: {target}}}
  - {{name: ris, type: mllp, host: 127.0.0.1, port: 6661}}
  - {{name: local, type: worklist}}
"""


def test_one_mpps_channel_and_emit_targets_are_checked_at_load(tmp_path: Path) -> None:
    path = _config(tmp_path, {
        "a": MPPS_CHANNEL.format(name="a", target="ris"),
        "b": MPPS_CHANNEL.format(name="b", target="local"),
        "c": MPPS_CHANNEL.format(name="c", target="nowhere"),
    })
    with pytest.raises(ConfigError) as caught:
        load_config(path, default_registry(), load_mappings=False)
    text = str(caught.value)
    assert "only one enabled channel may have a dicom source (channel a has one)" in text
    assert "sends to 'local', which is not a queued destination" in text
    assert "sends to 'nowhere', which is not a destination of this channel" in text
    assert "channels/a.yaml" not in text  # the first one is fine: the mllp destination is fed by steps


def test_an_mpps_channel_loads(tmp_path: Path) -> None:
    channel = MPPS_CHANNEL.format(name="a", target="ris").replace("  - {name: local, type: worklist}\n", "")
    loaded = load_config(_config(tmp_path, {"a": channel}), default_registry())
    spec = loaded.channels[0]
    assert spec.input.type == "dicom"
    assert json.loads(envelope("N-SET", "", "1.2", "", "", Dataset()))["dataset"] == {}


def test_status_message_beyond_ascii_says_utf8() -> None:
    text = build_status_message(OrderStatus("IP", patient_name="Müller^Jörg", placer_order="P1"), StatusFormat())
    msg = Message.parse(text.encode("utf-8"))
    assert msg.get("MSH-18") == "UNICODE UTF-8" and msg.get("PID-5.2") == "Jörg"
    assert Message.parse(build_status_message(OrderStatus("IP"), StatusFormat()).encode()).get("MSH-18") == ""
