"""ORDER/OBSERVATION groups own their segments; '/SEG-n' reads the message's. Messages in vendor dialects."""

from __future__ import annotations

import pytest

from engine.hl7.er7 import Message, compile_path


def er7(*segments: str) -> str:
    return "\r".join(segments) + "\r"


# Epic Radiant style v2.3 ORM^O01: two orders in one message, each with its own ZDS (IHE SWF
# study UID: UID^EPIC^Application^DICOM), an NTE on the first.
EPIC_TWO_ORDERS = er7(
    "MSH|^~\\&|EPIC|EPICADT|PACS|RAD|20261124083000||ORM^O01|EP1001|P|2.3",
    "PID|1||E1234567^^^EPI^MR||TESTPATIENT^ALPHA^^^^^L||19750315|F|||123 ELM ST^^MADISON^WI^53703^USA^P",
    "PV1|1|O|RADCT^^^UWRAD||||1234567^PROVIDER^PAT^^^^^^EPIC||||||||||||9000001",
    "ORC|NW|E20001^EPC|E20001^EPC||SC||^^^20261125090000^^R||20261124082955|||1234567^PROVIDER^PAT",
    "OBR|1|E20001^EPC|E20001^EPC|IMG123^CT ABDOMEN W CONTRAST^IMGPROC|||20261124082955|||||||||"
    "1234567^PROVIDER^PAT||ACCE1|ACCE1|||||CT|||^^^20261125090000^^R",
    "NTE|1||Premedicate: contrast allergy",
    "ZDS|1.2.840.114350.2.277.2.798268.2.20001.1^EPIC^Application^DICOM",
    "ORC|NW|E20002^EPC|E20002^EPC||SC||^^^20261125100000^^R||20261124082955|||1234567^PROVIDER^PAT",
    "OBR|2|E20002^EPC|E20002^EPC|IMG456^MR BRAIN WO^IMGPROC|||20261124082955|||||||||"
    "1234567^PROVIDER^PAT||ACCE2|ACCE2|||||MR|||^^^20261125100000^^R",
    "ZDS|1.2.840.114350.2.277.2.798268.2.20002.1^EPIC^Application^DICOM",
)

# GE Centricity RIS style v2.3.1: the ZDS follows the first OBR only; the second order has none.
GE_ZDS_FIRST_ONLY = er7(
    "MSH|^~\\&|CENTRICITY|GEHC|DCM4CHEE|PACS|20261124101500||ORM^O01|GE5501|P|2.3.1",
    "PID|||GE778899||WALKER^SUSAN^M||19620802|F",
    "PV1||O|US^ROOM2",
    "ORC|NW|GEP1|GEF1||SC||^^^20261124110000",
    "OBR|1|GEP1|GEF1|76700^US ABDOMEN COMPLETE^CPT4||||||||||||||GEACC1|GERP1|GESPS1||||US",
    "DG1|1||R10.9^Abdominal pain^I10",
    "ZDS|1.2.840.113619.2.98.3344.1.20261124.1^GE^Application^DICOM",
    "ORC|NW|GEP2|GEF2||SC||^^^20261124113000",
    "OBR|2|GEP2|GEF2|76856^US PELVIS^CPT4||||||||||||||GEACC2|GERP2|GESPS2||||US",
)

# Cerner style v2.3: a patient-level note and Z-segment before the orders, then one order with ZDS.
CERNER_PATIENT_LEVEL = er7(
    "MSH|^~\\&|HNAM_ORDERS|CERNER|RADNET|RAD|20261124120000||ORM^O01|Q9876543T1|P|2.3||||||8859/1",
    "PID|1|4455667^^^CERNER^FIN|88776655^^^CERNER^MRN||SAMPLE^CHARLIE||19880101|M",
    "NTE|1||Patient prefers morning appointments",
    "ZPI|1|Y|INTERPRETER NEEDED",
    "PV1|1|I|4W^412^01^MAIN||||2233^ATTENDING^ANN",
    "OBX|1|NM|HEIGHT||180|cm",
    "ORC|NW|CR100^HNAM_ORDERID||||||^^^20261124130000^^S",
    "OBR|1|CR100^HNAM_ORDERID||CTCHEST^CT Chest wo^CERNER||||||||||||||CRACC1|||||CT",
    "ZDS|1.2.840.113696.1.1.1.20261124.77^CERNER^Application^DICOM",
)

# OMI^O23 v2.5.1 (IHE RAD-4): each order its TQ1 and IPCs; the first has two procedure steps.
OMI_TWO_ORDERS = er7(
    "MSH|^~\\&|RIS|RAD|MWL|PACS|20261124153000||OMI^O23^OMI_O23|OMI7001|P|2.5.1",
    "PID|1||P700^^^HOSP^MR||DOE^JOHN||19700101|M",
    "PV1|1|O|RAD",
    "ORC|NW|PL701^RIS|FL701^RIS||SC",
    "TQ1|1||||||202611251400||S",
    "OBR|1|PL701^RIS|FL701^RIS|MRKNEE^MR Knee^LOCAL",
    "NTE|1||Left knee",
    "IPC|ACC701|RP701|1.2.826.0.1.3680043.8.498.701|SPS701A|MR|MRKNEE^MR Knee T1^LOCAL|||MRI1",
    "IPC|ACC701|RP701|1.2.826.0.1.3680043.8.498.701|SPS701B|MR|MRKNEE^MR Knee T2^LOCAL|||MRI1",
    "ORC|NW|PL702^RIS|FL702^RIS||SC",
    "TQ1|1||||||202611251500||R",
    "OBR|2|PL702^RIS|FL702^RIS|CTHEAD^CT Head^LOCAL",
    "ORC|NW|PL703^RIS|FL703^RIS||SC",
    "OBR|3|PL703^RIS|FL703^RIS|XRCHEST^XR Chest^LOCAL",
    "IPC|ACC703|RP703|1.2.826.0.1.3680043.8.498.703|SPS703|CR",
)


def test_each_order_reads_its_own_zds() -> None:
    orders = Message.parse(EPIC_TWO_ORDERS).groups("ORDER")
    assert [g.get("OBR-18") for g in orders] == ["ACCE1", "ACCE2"]
    assert [g.get("ZDS-1.1") for g in orders] == [
        "1.2.840.114350.2.277.2.798268.2.20001.1",
        "1.2.840.114350.2.277.2.798268.2.20002.1",
    ]
    assert [s.name for s in orders[0].segments()] == ["ORC", "OBR", "NTE", "ZDS"]
    assert [g.get("NTE-3") for g in orders] == ["Premedicate: contrast allergy", ""]
    assert [g.get("PID-3.1") for g in orders] == ["E1234567", "E1234567"]  # message-level: falls back
    assert orders[1].get("PV1-19") == "9000001" and orders[1].get("MSH-10") == "EP1001"


def test_order_without_zds_does_not_take_the_first_orders() -> None:
    m = Message.parse(GE_ZDS_FIRST_ONLY)
    first, second = m.groups("ORDER")
    assert first.get("ZDS-1.1") == "1.2.840.113619.2.98.3344.1.20261124.1"
    assert second.get("ZDS-1.1") == "" and second.get("ZDS-1") == ""
    assert second.get_all("ZDS-1.1") == [] and second.components("ZDS-1") == []
    assert second.segments("ZDS") == []
    # DG1 sits inside the first order in this message: the second does not see it either
    assert first.get("DG1-3.1") == "R10.9" and second.get("DG1-3.1") == ""
    # the message-level one, asked for explicitly
    assert second.get("/ZDS-1.1") == "1.2.840.113619.2.98.3344.1.20261124.1"
    assert second.components("/ZDS-1") == ["1.2.840.113619.2.98.3344.1.20261124.1", "GE", "Application", "DICOM"]
    assert second.get_all("/OBR-18") == ["GEACC1", "GEACC2"]
    assert m.get("/ZDS-1.2") == m.get("ZDS-1.2") == "GE"


def test_patient_level_segments_fall_back_order_ones_do_not() -> None:
    m = Message.parse(CERNER_PATIENT_LEVEL)
    (order,) = m.groups("ORDER")
    assert order.get("ZDS-1.2") == "CERNER"
    assert order.get("ZPI-3") == "INTERPRETER NEEDED"  # a patient-level Z-segment: the message's
    assert order.get("PV1-3.2") == "412"
    assert order.get("NTE-3") == ""  # the patient's note is not the order's
    assert order.get("/NTE-3") == "Patient prefers morning appointments"
    assert order.get("OBX-5") == "" and order.get("/OBX-5") == "180"  # a patient observation


def test_omi_orders_own_tq1_and_ipc() -> None:
    orders = Message.parse(OMI_TWO_ORDERS).groups("ORDER")
    assert [[s.name for s in g.segments()] for g in orders] == [
        ["ORC", "TQ1", "OBR", "NTE", "IPC", "IPC"],
        ["ORC", "TQ1", "OBR"],
        ["ORC", "OBR", "IPC"],
    ]
    assert [g.get("TQ1-9") for g in orders] == ["S", "R", ""]
    assert [g.get("IPC-3") for g in orders] == [
        "1.2.826.0.1.3680043.8.498.701",
        "",
        "1.2.826.0.1.3680043.8.498.703",
    ]
    assert orders[0].get_all("IPC-4") == ["SPS701A", "SPS701B"]
    assert orders[0].get("IPC[2]-6.2") == "MR Knee T2"
    assert orders[1].get("IPC-1") == "" and orders[1].get_all("IPC-4") == []
    assert orders[1].get("NTE-3") == ""


def test_orm_with_orc_and_no_obr() -> None:
    # a status-only order control (ORC without OBR) after a full order: it has no OBR of its own
    m = Message.parse(
        er7(
            "MSH|^~\\&|RIS|RAD|MWL|PACS|20261124153000||ORM^O01|OC1|P|2.3",
            "PID|1||P800",
            "ORC|NW|PL801||||SC",
            "OBR|1|PL801||CTHEAD||||||||||||||ACC801",
            "ZDS|1.2.3.801",
            "ORC|CA|PL802||||CA",
        )
    )
    first, second = m.groups("ORDER")
    assert (second.get("ORC-1"), second.get("ORC-2")) == ("CA", "PL802")
    assert second.get("OBR-18") == "" and second.get("ZDS-1") == ""
    assert second.get("/OBR-18") == "ACC801"
    assert second.get("PID-3") == "P800"
    only = Message.parse("MSH|^~\\&|RIS|RAD|MWL|PACS|20261124||ORM^O01|OC2|P|2.3\rPID|1||P9\rORC|DC|PL9||||CA\r")
    (g,) = only.groups("ORDER")
    assert (g.get("ORC-1"), g.get("OBR-18"), g.get("PID-3")) == ("DC", "", "P9")


def test_z_segment_found_in_one_order_is_owned_by_every_order() -> None:
    m = Message.parse(
        er7(
            "MSH|^~\\&|RIS|RAD|MWL|PACS|20261124||ORM^O01|Z1|P|2.4",
            "PID|1||P1",
            "ORC|NW|A",
            "OBR|1|A",
            "ZXR|room-a",
            "ORC|NW|B",
            "OBR|2|B",
        )
    )
    first, second = m.groups("ORDER")
    assert (first.get("ZXR-1"), second.get("ZXR-1"), second.get("/ZXR-1")) == ("room-a", "", "room-a")


def test_observations_from_the_message_fall_back_to_their_own_order() -> None:
    m = Message.parse(
        er7(
            "MSH|^~\\&|RIS|RAD|EMR|HOSP|20261124||ORU^R01|R1|P|2.5.1",
            "PID|1||P1",
            "OBR|1|||CTHEAD^CT Head",
            "OBX|1|TX|||head text",
            "OBR|2|||CTCHEST^CT Chest",
            "ZDS|1.2.3.2",
            "OBX|1|TX|||chest text",
            "NTE|1||chest note",
        )
    )
    obs = m.groups("OBSERVATION")
    assert [o.get("OBX-5") for o in obs] == ["head text", "chest text"]
    assert [o.get("OBR-4.1") for o in obs] == ["CTHEAD", "CTCHEST"]
    assert [o.get("ZDS-1") for o in obs] == ["", "1.2.3.2"]
    assert [o.get("NTE-3") for o in obs] == ["", "chest note"]
    assert [o.get("PID-3") for o in obs] == ["P1", "P1"]
    # inside an order, an observation without its own NTE does not read a sibling's
    (_, chest) = m.groups("ORDER")
    assert [o.get("OBX-1") for o in chest.groups("OBSERVATION")] == ["1"]


def test_root_path_compiles_and_sets_on_the_message() -> None:
    p = compile_path("/ZDS-1.1")
    assert (p.root, p.segment, p.field, p.component, str(p)) == (True, "ZDS", 1, 1, "/ZDS-1.1")
    assert compile_path("ZDS-1.1").root is False
    m = Message.parse(GE_ZDS_FIRST_ONLY)
    second = m.groups("ORDER")[1]
    with pytest.raises(ValueError):
        second.set("ZDS-1", "1.2.3")  # a group cannot grow a segment
    second.set("/PV1-3.2", "ROOM3")
    assert m.get("PV1-3") == "US^ROOM3"


@pytest.mark.parametrize("bad", ["//ZDS-1", "ZDS/-1", "/ZDS-1/", "/ ZDS-1", "/"])
def test_bad_root_paths(bad: str) -> None:
    with pytest.raises(ValueError, match="HL7 path"):
        compile_path(bad)
