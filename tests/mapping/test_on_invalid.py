"""Real messages are messy: an optional value that fails its format or table is dropped with a
warning, a required one refuses the message, and a `from:` chain tries its next field first."""

from __future__ import annotations

import pytest

from engine.errors import ProcessingError, ProcessingWarning
from engine.hl7.er7 import Message
from engine.mapping import MappingConfigError, load_mapping
from tests.mapping.conftest import MAPPINGS, SAMPLES

CT = (SAMPLES / "orm_o01_ct.hl7").read_text(encoding="latin-1")
ORC_TIMING = "^^^202611251000^^R"


@pytest.fixture(scope="module")
def worklist():
    return load_mapping(MAPPINGS / "orm-to-worklist.yaml")


def line_of(text: str) -> int:
    """The line of the shipped mapping where `text` first appears."""
    lines = (MAPPINGS / "orm-to-worklist.yaml").read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


def run(mapping, text: str) -> tuple[dict, list[ProcessingWarning]]:
    warnings: list[ProcessingWarning] = []
    (out,) = mapping.run(Message.parse(text), warnings)
    return out["dataset"], warnings


def test_a_clean_message_has_no_warnings(worklist):
    _, warnings = run(worklist, CT)
    assert warnings == []


def test_optional_values_outside_their_table_are_dropped_with_warnings(worklist):
    text = CT.replace("|19800512|F|", "|19800512|M-|").replace(ORC_TIMING, "^^^202611251000^^X", 1)
    ds, warnings = run(worklist, text)
    assert ds["PatientSex"] == ""
    assert ds["RequestedProcedurePriority"] == "ROUTINE"  # the chain's next field, OBR-27.6 (R)
    assert ds["PatientID"] == "100234"  # the rest maps as before
    by_target = {w.target: w for w in warnings}
    assert set(by_target) == {"PatientSex", "RequestedProcedurePriority"}
    sex, prio = by_target["PatientSex"], by_target["RequestedProcedurePriority"]
    assert (sex.code, sex.location) == (103, "PID-8")
    assert sex.source == f"mappings/orm-to-worklist.yaml:{line_of('PatientSex:')}"
    assert (prio.code, prio.location) == (103, "ORC-7.6") and "priority.csv" in prio.text
    assert prio.source == f"mappings/orm-to-worklist.yaml:{line_of('RequestedProcedurePriority:')}"
    assert all("M-" not in w.text for w in warnings)  # names fields, never values
    assert prio.as_dict()["location"] == "ORC-7.6"


def test_an_invalid_required_value_is_still_refused(worklist):
    text = CT.replace(ORC_TIMING, "^^^tomorrow^^R")  # ORC-7.4 and OBR-27.4: no valid time anywhere
    with pytest.raises(ProcessingError) as err:
        run(worklist, text)
    assert err.value.code == 102 and err.value.location == "ORC-7.4.1"
    assert err.value.source == f"mappings/orm-to-worklist.yaml:{line_of('ScheduledProcedureStepStartDate:')}"


def test_a_default_rule_speaks_for_its_required_target(worklist):
    """Modality is required; its default (OBR-4.1 through a table) rejects an unknown code as 103."""
    text = CT.replace("||||CT|||", "|||||||").replace("CTHEAD^CT Head without contrast^LOCAL|R|", "XX^X^LOCAL|R|")
    with pytest.raises(ProcessingError) as err:
        run(worklist, text)
    assert err.value.code == 103 and err.value.location == "OBR-4.1"


def test_garbage_in_the_first_field_of_a_chain_falls_back_to_the_next(worklist):
    text = CT.replace(ORC_TIMING, "^^^2026-13-45^^R", 1)  # ORC-7.4 broken; OBR-27.4 holds the time
    ds, warnings = run(worklist, text)
    sps = ds["ScheduledProcedureStepSequence"][0]
    assert (sps["ScheduledProcedureStepStartDate"], sps["ScheduledProcedureStepStartTime"]) == ("20261125", "100000")
    assert {(w.target, w.location, w.code) for w in warnings} == {
        ("ScheduledProcedureStepStartDate", "ORC-7.4.1", 102),
        ("ScheduledProcedureStepStartTime", "ORC-7.4.1", 102),
    }
    assert all("OBR-27.4.1 used instead" in w.text for w in warnings)


def test_chain_fallback_through_a_table(mapping, msg):
    m = mapping(
        """
        prio: {from: [ORC-7.6, OBR-5], map: {S: STAT, R: ROUTINE}}
        """,
    )
    text = msg.text.replace(
        "OBR|1|PL1^RIS|FL1^PACS|CTHEAD^CT Head^LOCAL|", "OBR|1|PL1^RIS|FL1^PACS|CTHEAD^CT Head^LOCAL|R"
    )
    text = text.replace("^^^202611251000^^S", "^^^202611251000^^Q")
    warnings: list[ProcessingWarning] = []
    assert m.run(Message.parse(text), warnings) == [{"prio": "ROUTINE"}]
    (w,) = warnings
    assert (w.location, w.code, w.target) == ("ORC-7.6", 103, "prio") and "OBR-5 used instead" in w.text


def test_iso_8601_times_are_read_with_a_warning(worklist):
    for iso in ("2026-11-25T08:30:00+01:00", "2026-11-25 08:30"):
        ds, warnings = run(worklist, CT.replace(ORC_TIMING, f"^^^{iso}^^R", 1))
        sps = ds["ScheduledProcedureStepSequence"][0]
        assert sps["ScheduledProcedureStepStartDate"] == "20261125"
        assert sps["ScheduledProcedureStepStartTime"] == "083000"
        assert {(w.location, w.code) for w in warnings} == {("ORC-7.4.1", 102)} and len(warnings) == 2
        assert all("ISO 8601" in w.text for w in warnings)


def test_an_order_message_without_obr_names_the_missing_group(worklist):
    text = "\r".join(s for s in CT.replace("\n", "\r").split("\r") if not s.startswith(("OBR", "NTE", "DG1", "ZDS")))
    with pytest.raises(ProcessingError) as err:
        worklist.run(Message.parse(text))
    assert (err.value.code, err.value.location) == (100, "OBR")
    assert "no ORDER group (no ORC/OBR)" in err.value.text


def test_explicit_on_invalid(mapping, msg):
    m = mapping(
        """
        strict: {from: PID-8, map: {M: male}, on_invalid: reject}
        """,
    )
    with pytest.raises(ProcessingError) as err:
        m.run(msg)
    assert err.value.code == 103 and err.value.location == "PID-8"
    lax = mapping("sex: {from: PID-8, map: {M: male}, required: true, on_invalid: drop, default: unknown}")
    warnings: list[ProcessingWarning] = []
    assert lax.run(msg, warnings) == [{"sex": "unknown"}] and warnings[0].location == "PID-8"
    dropped_required = mapping("sex: {from: PID-8, map: {M: male}, required: true, on_invalid: drop}")
    with pytest.raises(ProcessingError) as err:
        dropped_required.run(msg)
    assert err.value.code == 101  # dropped, then required and empty


def test_repetitions_are_dropped_one_by_one(mapping, msg):
    m = mapping("ids: {from: 'PID-3[*].5', map: {MR: medical record}}")
    warnings: list[ProcessingWarning] = []
    assert m.run(msg, warnings) == [{"ids": ["medical record"]}]
    (w,) = warnings
    assert w.code == 103 and "repetition dropped" in w.text


def test_a_message_level_warning_is_recorded_once_for_all_groups(mapping, two_orders):
    m = mapping("sex: {from: PID-8, map: {M: male}}\nacc: {from: OBR-18}", header="for_each: ORDER\n")
    warnings: list[ProcessingWarning] = []
    assert [o["acc"] for o in m.run(Message.parse(two_orders), warnings)] == ["ACC1", "ACC2"]
    assert len(warnings) == 1


def test_closure_and_generated_code_agree(mapping, msg):
    """A rule with `when:` is not inlined; it drops and warns exactly as the inlined one."""
    m = mapping(
        """
        inlined: {from: PID-8, format: sex_to_dicom}
        closure: {from: PID-8, format: sex_to_dicom, when: ORC-1 == NW}
        """,
    )
    text = msg.text.replace("|19800512|F", "|19800512|Q")
    warnings: list[ProcessingWarning] = []
    assert m.run(Message.parse(text), warnings) == [{"inlined": "", "closure": ""}]
    assert sorted(w.target for w in warnings) == ["closure", "inlined"]


def test_on_invalid_must_be_drop_or_reject(write_mapping):
    path = write_mapping("name: x\ninput: hl7v2\noutput: json\nfields:\n  a: {from: PID-8, on_invalid: ignore}\n")
    with pytest.raises(MappingConfigError) as err:
        load_mapping(path)
    (p,) = err.value.problems
    assert (p.line, p.key) == (5, "fields.a.on_invalid") and "drop, reject" in p.message
