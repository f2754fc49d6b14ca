"""Loading: every problem of a mapping file is reported at once, with file, line and key."""

from __future__ import annotations

import pytest

from engine.mapping import MappingConfigError, load_mapping

BROKEN = """
name: broken
input: hl7v2
output: dicom
colour: blue
settings:
  timezone: Mars/Olympus
  study_uid_policy: sometimes
fields:
  dataset:
    PatientID: {from: PID-3.1, requird: true}
    PatientName: {from: PID-5, format: xpn_to_dicom}
    PatientSex: {from: PID-88x}
    RequestedProcedurePriority: {from: ORC-7.6, table: nowhere.csv}
    PatientsName: {from: PID-5}
    AccessionNumber: {from: OBR-18, when: "OBR-18 = x"}
    StudyInstanceUID: {from: ZDS-1, format: study_uid}
    Modality: {from: OBR-24, on_missing: error}
    ScheduledProcedureStepSequence:
      - Modality: {value: "{OBR-24"}
"""


def test_every_problem_is_reported_with_its_line(write_mapping):
    with pytest.raises(MappingConfigError) as err:
        load_mapping(write_mapping(BROKEN))
    problems = err.value.problems
    found = {(p.line, p.key) for p in problems}
    expected = {
        (4, "colour"),
        (6, "settings.timezone"),
        (7, "settings.study_uid_policy"),
        (10, "fields.dataset.PatientID.requird"),
        (11, "fields.dataset.PatientName.format"),
        (12, "fields.dataset.PatientSex.from"),
        (13, "fields.dataset.RequestedProcedurePriority.table"),
        (14, "fields.dataset.PatientsName"),
        (15, "fields.dataset.AccessionNumber.when"),
        (16, "fields.dataset.StudyInstanceUID.format"),
        (17, "fields.dataset.Modality.on_missing"),
        (19, "fields.dataset.ScheduledProcedureStepSequence[0].Modality.value"),
    }
    assert expected <= found, sorted(found)
    assert all(p.file == "mappings/m.yaml" and p.column >= 1 for p in problems)
    by_key = {p.key: p.message for p in problems}
    assert "did you mean required" in by_key["fields.dataset.PatientID.requird"]
    assert "xpn_to_dicom" in by_key["fields.dataset.PatientName.format"]
    assert "nowhere.csv" in by_key["fields.dataset.RequestedProcedurePriority.table"]
    assert "did you mean PatientName" in by_key["fields.dataset.PatientsName"]
    assert "accession" in by_key["fields.dataset.StudyInstanceUID.format"]
    # the text form is file:line:col key: message, one per line
    assert str(err.value).splitlines()[0].startswith("mappings/m.yaml:4:1 colour:")


def test_required_top_level_keys(write_mapping):
    with pytest.raises(MappingConfigError) as err:
        load_mapping(write_mapping("name: x\ninput: csv\n"))
    keys = {p.key for p in err.value.problems}
    assert {"input", "output", "fields"} <= keys


def test_yaml_syntax_error_has_a_line(write_mapping):
    with pytest.raises(MappingConfigError) as err:
        load_mapping(write_mapping("name: x\nfields:\n  a: {from: PID-3\n  b: 1\n"))
    (p,) = err.value.problems
    assert p.line >= 3 and "YAML" in p.message


def test_rule_shape_problems(write_mapping):
    text = """
    name: x
    input: hl7v2
    output: json
    for_each: VISIT
    fields:
      a: {required: true}
      b: {from: PID-3, value: x}
      c: {from: {path: PID-3}}
      d: {from: PID-3, required: yes please}
      e: {from: PID-3, map: {X: Y}, table: t.csv}
      f: {from: PID-5, format: [upper, xpn_to_pn]}
      g: {value: x, format: xpn_to_pn}
      h: {from: PID-7, format: dtm_to_fhir}
      i: {from: "PID-3[*].1[*]"}
    """
    with pytest.raises(MappingConfigError) as err:
        load_mapping(write_mapping(text))
    keys = {p.key for p in err.value.problems}
    assert {
        "for_each",
        "fields.a",
        "fields.b.value",
        "fields.c.from",
        "fields.d.required",
        "fields.e.table",
        "fields.f.format",
        "fields.g.format",
        "fields.h.format",
        "fields.i.from",
    } <= keys
    msgs = " ".join(p.message for p in err.value.problems)
    assert "settings.timezone" in msgs  # dtm_to_fhir needs a time zone


def test_bad_table_file_content(write_mapping):
    path = write_mapping(
        "name: x\ninput: hl7v2\noutput: json\nfields:\n  a: {from: ORC-1, table: t.csv}\n",
        tables={"t.csv": "key,val\nA,B\n"},
    )
    with pytest.raises(MappingConfigError) as err:
        load_mapping(path)
    assert "code,value" in err.value.problems[0].message and err.value.problems[0].line == 5


def test_examples_shape_is_checked(write_mapping):
    text = """
    name: x
    input: hl7v2
    output: json
    fields:
      a: {from: ORC-1}
    examples:
      - message: samples/hl7/x.hl7
      - expect: {a: NW}
      - {message: x.hl7, expect: {}, expected: 1}
    """
    with pytest.raises(MappingConfigError) as err:
        load_mapping(write_mapping(text))
    lines = sorted(p.line for p in err.value.problems)
    assert lines == [7, 8, 9]


def test_valid_mapping_attributes(write_mapping):
    m = load_mapping(
        write_mapping(
            "name: ok\ninput: hl7v2\noutput: fhir\nfor_each: ORDER\n"
            "settings: {timezone: UTC}\nfields:\n  a: {from: ORC-1}\n"
        )
    )
    assert (m.name, m.input, m.output, m.for_each) == ("ok", "hl7v2", "fhir", "ORDER")
    assert m.settings.timezone == "UTC" and m.settings.keep_empty is False
    assert "ok" in repr(m)


def test_header_settings_and_examples_errors_are_located_with_did_you_mean(write_mapping):
    text = """
    name: x
    input: hl7v2
    output: xml
    for_eac: ORDER
    settings:
      timezone: Europe/Berlin
      keep_empty: "yes"
      uid_rot: "1.2.3"
    fields:
      a: {from: ORC-1}
    examples:
      - {message: x.hl7, expect: {a: NW}, eror: {code: 101}}
      - {message: x.hl7, error: {code: 101, where: ORC-1}}
    """
    with pytest.raises(MappingConfigError) as err:
        load_mapping(write_mapping(text))
    by_key = {p.key: p for p in err.value.problems}
    assert by_key["output"].line == 3 and "dicom" in by_key["output"].message
    assert by_key["for_eac"].line == 4 and "did you mean for_each" in by_key["for_eac"].message
    assert by_key["settings.keep_empty"].line == 7
    assert by_key["settings.uid_rot"].line == 8 and "did you mean uid_root" in by_key["settings.uid_rot"].message
    assert by_key["examples.0.eror"].line == 12 and "did you mean error" in by_key["examples.0.eror"].message
    assert by_key["examples.1.error.where"].line == 13
    assert "known: code, location, text" in by_key["examples.1.error.where"].message
    assert str(by_key["settings.uid_rot"]).startswith("mappings/m.yaml:8:3 settings.uid_rot: unknown key")


def test_input_is_looked_up_among_the_registered_adapters(write_mapping):
    path = write_mapping("name: x\ninput: fhir_r4\noutput: json\nfields:\n  a: {from: ORC-1}\n")
    with pytest.raises(MappingConfigError) as err:
        load_mapping(path)
    (p,) = err.value.problems
    assert (p.line, p.key) == (2, "input") and "known: hl7v2" in p.message
    with pytest.raises(MappingConfigError) as err:
        load_mapping(path, inputs=("hl7v2", "fhir"))
    message = err.value.problems[0].message
    assert "did you mean fhir" in message and "known: fhir, hl7v2" in message
    m = load_mapping(path, inputs=("hl7v2", "fhir_r4"))
    assert m.input == "fhir_r4"
