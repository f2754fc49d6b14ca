"""for_each: ORDER reads each order's own ZDS/IPC; '/ZDS-1' reads the message's (see engine/hl7/er7.py Group)."""

from __future__ import annotations

from engine.hl7.er7 import Message
from engine.mapping import load_mapping
from engine.mapping.paths import check_path, repetition_path, segment_of

from .conftest import MAPPINGS

# GE Centricity style v2.3.1 ORM: a ZDS after the first OBR only.
GE = "\r".join(
    [
        "MSH|^~\\&|CENTRICITY|GEHC|MWL|PACS|20261124101500||ORM^O01|GE5501|P|2.3.1",
        "PID|||GE778899^^^GE^MR||WALKER^SUSAN^M||19620802|F",
        "PV1||O|US^ROOM2",
        "ORC|NW|GEP1|GEF1||SC||^^^20261124110000^^R",
        "OBR|1|GEP1|GEF1|76700^US ABDOMEN COMPLETE^CPT4||||||||||||||GEACC1|GERP1|GESPS1||||US",
        "ZDS|1.2.840.113619.2.98.3344.1.20261124.1^GE^Application^DICOM",
        "ORC|NW|GEP2|GEF2||SC||^^^20261124113000^^R",
        "OBR|2|GEP2|GEF2|76856^US PELVIS^CPT4||||||||||||||GEACC2|GERP2|GESPS2||||US",
    ]
) + "\r"


def test_root_paths_are_paths() -> None:
    check_path("/ZDS-1.1")
    assert segment_of("/ZDS-1.1") == "ZDS" and segment_of("ZDS-1.1") == "ZDS"
    assert repetition_path("/PID-3[*].1", 2) == "/PID-3[2].1"


def test_each_order_its_zds_or_the_messages_when_asked(mapping) -> None:
    m = mapping(
        """
        own: {from: ZDS-1.1}
        msg: {from: /ZDS-1.1}
        parts: {from: /ZDS-1, format: cwe_to_code_item}
        acc: {from: OBR-18}
    """,
        header="for_each: ORDER\n",
    )
    uid = "1.2.840.113619.2.98.3344.1.20261124.1"
    out = m.run(Message.parse(GE))
    assert [(o.get("own", ""), o["msg"], o["acc"]) for o in out] == [(uid, uid, "GEACC1"), ("", uid, "GEACC2")]
    assert out[0]["parts"] == out[1]["parts"]


def test_shipped_worklist_mapping_gives_two_procedures_two_study_uids() -> None:
    mapping = load_mapping(MAPPINGS / "orm-to-worklist.yaml")
    items = mapping.run(Message.parse(GE))
    uids = [item["dataset"]["StudyInstanceUID"] for item in items]
    assert uids[0] == "1.2.840.113619.2.98.3344.1.20261124.1"
    assert uids[1] and uids[1] != uids[0]  # the second order's UID comes from its accession
