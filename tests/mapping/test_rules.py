"""Rule features: from, value/templates, default, required, tables, when, for_each, nesting."""

from __future__ import annotations

import pytest

from engine.errors import ProcessingError, ProcessingWarning
from engine.hl7.er7 import Message


def test_from_single_and_first_non_empty(mapping, msg):
    m = mapping("""
        a: {from: OBR-18}
        b: {from: [IPC-1, ZZZ-1, OBR-19]}
        c: {from: [OBR-50, OBR-51]}
        d: {from: PID-5.2}
    """)
    assert m.run(msg) == [{"a": "ACC1", "b": "RP1", "c": "", "d": "Mary"}]


def test_repeat_path_always_gives_a_list(mapping, msg):
    m = mapping("""
        ids: {from: "PID-3[*].1"}
        issuers: {from: "PID-3[*].4"}
        none: {from: "OBR-50[*]"}
    """)
    out = m.run(msg)[0]
    assert out["ids"] == ["100234", "555"]
    assert out["issuers"] == ["HOSP", "OTHER"]
    assert out["none"] == []


def test_value_literal_template_and_all_empty_template(mapping, msg):
    m = mapping("""
        lit: {value: fixed}
        num: {value: 5}
        scalar: plain literal
        tpl: {value: "{ORC-2.1}-{ORC-2.2}"}
        braces: {value: "{{x}} {ORC-1}"}
        empty: {value: "{OBR-50}-{OBR-51}", default: none}
    """)
    out = m.run(msg)[0]
    assert out == {
        "lit": "fixed",
        "num": 5,
        "scalar": "plain literal",
        "tpl": "PL1-RIS",
        "braces": "{x} NW",
        "empty": "none",
    }


def test_default_literal_template_and_rule(mapping, msg):
    m = mapping("""
        a: {from: OBR-50, default: X}
        b: {from: OBR-50, default: "{OBR-18}/{OBR-19}"}
        c: {from: OBR-50, default: {from: OBR-4.1, map: {CTHEAD: CT}}}
        d: {from: OBR-18, default: unused}
        e: {default: only}
    """)
    assert m.run(msg)[0] == {"a": "X", "b": "ACC1/RP1", "c": "CT", "d": "ACC1", "e": "only"}


def test_required_missing_gives_101_with_location_and_source_line(mapping, msg):
    m = mapping("""
        ok: {from: OBR-18}
        acc:
          from: [IPC-1, OBR-50]
          required: true
    """)
    with pytest.raises(ProcessingError) as err:
        m.run(msg)
    e = err.value
    assert e.code == 101
    assert e.location == "OBR-50"  # IPC is not in the message: the OBR path is the one to fix
    assert e.source == "mappings/m.yaml:6"
    assert "acc" in e.text and "Mary" not in str(e)


def test_required_satisfied_by_default(mapping, msg):
    m = mapping("a: {from: OBR-50, default: D, required: true}")
    assert m.run(msg) == [{"a": "D"}]


def test_inline_map_and_on_missing(mapping, msg):
    m = mapping("""
        known: {from: ORC-1, map: {NW: new, CA: cancel}}
        dflt: {from: OBR-24, map: {MR: MR, _default: OT}}
        keep: {from: OBR-24, map: {MR: MR}, on_missing: keep}
        dflt2: {from: OBR-24, map: {MR: MR}, on_missing: default, default: rule-default}
        empty: {from: OBR-50, map: {MR: MR}}
    """)
    assert m.run(msg)[0] == {"known": "new", "dflt": "OT", "keep": "CT", "dflt2": "rule-default", "empty": ""}


def test_unknown_code_is_103_when_rejected(mapping, msg):
    m = mapping("""
        x: {from: OBR-24, map: {MR: MR}, on_invalid: reject}
        y: {from: OBR-24, map: {MR: MR}, required: true}
    """)
    with pytest.raises(ProcessingError) as err:
        m.run(msg)
    assert err.value.code == 103 and err.value.location == "OBR-24"
    assert err.value.source.endswith("m.yaml:5")


def test_unknown_code_of_an_optional_target_is_dropped_with_a_warning(mapping, msg):
    m = mapping("""
        x: {from: OBR-24, map: {MR: MR}}
        y: {from: ORC-1}
    """)
    warnings: list[ProcessingWarning] = []
    assert m.run(msg, warnings) == [{"x": "", "y": "NW"}]
    (w,) = warnings
    assert (w.code, w.location, w.target, w.source) == (103, "OBR-24", "x", "mappings/m.yaml:5")
    assert "inline" in w.text and "CT" not in w.text  # names the table, never the value
    assert m.run(msg) == [{"x": "", "y": "NW"}]  # nobody asked for the warnings: still maps


def test_csv_tables_and_chains(mapping, msg):
    tables = {
        "prio.csv": "code,value\nS,STAT\nR,ROUTINE\n",
        "proc.csv": "code,value\nCTHEAD,CT\n",
        "aet.csv": "code,value\nCT,CT_AE\n_default,ANY\n",
    }
    m = mapping(
        """
        prio: {from: ORC-7.6, table: prio.csv}
        short: {from: ORC-7.6, map: prio.csv}
        aet: {from: OBR-4.1, table: [proc.csv, aet.csv]}
    """,
        tables=tables,
    )
    assert m.run(msg)[0] == {"prio": "STAT", "short": "STAT", "aet": "CT_AE"}


def test_when_on_rules(mapping, msg):
    m = mapping("""
        cancel: {value: yes, when: "ORC-1 == 'CA'"}
        new: {value: yes, when: "ORC-1 == NW and OBR-24 in [CT, MR]"}
        sexless: {value: yes, when: PID-8 is empty}
        sexed: {value: yes, when: PID-8 is not empty or ORC-1 != NW}
    """)
    assert m.run(msg)[0] == {"new": "yes", "sexed": "yes"}


def test_message_level_when(mapping, msg):
    m = mapping("a: {from: ORC-1}", header="when: MSH-9.1 == ADT\n")
    assert m.run(msg) == []
    m2 = mapping("a: {from: ORC-1}", header="when: MSH-9.1 == ORM\n")
    assert m2.run(msg) == [{"a": "NW"}]


def test_for_each_order_resolves_paths_in_the_group(mapping, two_orders):
    m = mapping(
        """
        pid: {from: PID-3.1}
        acc: {from: OBR-18}
        placer: {from: ORC-2.1}
    """,
        header="for_each: ORDER\n",
    )
    assert m.run(Message.parse(two_orders)) == [
        {"pid": "100234", "acc": "ACC1", "placer": "PL1"},
        {"pid": "100234", "acc": "ACC2", "placer": "PL2"},
    ]


def test_for_each_error_names_the_group(mapping, two_orders):
    m = mapping("mod: {from: OBR-24, map: {CT: CT}, on_invalid: reject}", header="for_each: ORDER\n")
    with pytest.raises(ProcessingError) as err:
        m.run(Message.parse(two_orders))
    assert err.value.code == 103 and "ORDER group 2" in err.value.text


def test_for_each_without_groups(mapping, orm):
    no_order = "\r".join(orm.split("\r")[:3])
    m = mapping("a: {from: PID-3.1}", header="for_each: ORDER\n")
    with pytest.raises(ProcessingError) as err:
        m.run(Message.parse(no_order))
    assert err.value.code == 100
    skip = mapping("a: {from: PID-3.1}", header="for_each: ORDER\nsettings: {empty_groups: skip}\n")
    assert skip.run(Message.parse(no_order)) == []


def test_for_each_observation(mapping):
    oru = "\r".join(
        [
            "MSH|^~\\&|RIS|RAD|ENGINE|HOSP|20261124153000||ORU^R01|C2|P|2.5.1",
            "PID|1||100234^^^HOSP^MR",
            "OBR|1||FL1|CTHEAD",
            "OBX|1|TX|REP||line one",
            "OBX|2|TX|REP||line two",
        ]
    )
    m = mapping("text: {from: OBX-5}\nn: {from: OBX-1}", header="for_each: OBSERVATION\n")
    assert m.run(Message.parse(oru)) == [{"text": "line one", "n": "1"}, {"text": "line two", "n": "2"}]


def test_nested_objects_and_sequences(mapping, msg):
    m = mapping("""
        control:
          order_control: {from: ORC-1}
        dataset:
          Seq:
            - A: {from: OBR-18}
              Inner:
                - {from: OBR-4, format: cwe_to_code_item}
                - {from: OBR-50, format: cwe_to_code_item}
          Codes:
            - {from: "PID-3[*].1"}
            - {value: extra}
    """)
    out = m.run(msg)[0]
    assert out["control"] == {"order_control": "NW"}
    assert out["dataset"]["Seq"] == [
        {"A": "ACC1", "Inner": [{"CodeValue": "CTHEAD", "CodingSchemeDesignator": "LOCAL", "CodeMeaning": "CT Head"}]}
    ]
    assert out["dataset"]["Codes"] == ["100234", "555", "extra"]


def test_fhir_output_drops_empty_values_json_keeps_them(mapping, msg):
    fields = """
        a: {from: OBR-50}
        b: {from: OBR-18}
        c: {value: 0}
        d: {value: false}
    """
    assert mapping(fields, output="fhir").run(msg) == [{"b": "ACC1", "c": 0, "d": False}]
    assert mapping(fields).run(msg) == [{"a": "", "b": "ACC1", "c": 0, "d": False}]


def test_rule_when_false_leaves_target_out_even_if_required(mapping, msg):
    m = mapping("a: {from: OBR-50, required: true, when: ORC-1 == CA}")
    assert m.run(msg) == [{}]


def test_format_chain(mapping, msg):
    m = mapping("""
        a: {value: "  low  ", format: [trim, upper]}
        names: {from: "PID-3[*].4", format: upper, map: {HOSP: H, OTHER: O}}
    """)
    assert m.run(msg)[0] == {"a": "LOW", "names": ["H", "O"]}


def test_orm_fixture_is_well_formed(msg):
    assert msg.message_type == "ORM^O01"


ORU = "\r".join(
    [
        "MSH|^~\\&|RIS|RAD|ENGINE|HOSP|20261125120000||ORU^R01|C3|P|2.5.1",
        "PID|1||100234^^^HOSP^MR",
        "OBR|1||FL1|CTHEAD^CT Head^LOCAL",
        "OBX|1|TX|REP^Report^LOCAL||CT head:",
        "OBX|2|TX|REP^Report^LOCAL||No acute findings.",
        "OBX|3|CE|IMP^Impression^LOCAL||NORMAL^Normal^LOCAL",
    ]
)


def test_repeated_items_per_group_and_joined_lines(mapping):
    m = mapping(
        """
        resourceType: DiagnosticReport
        text: {from: "OBX[*]-5", format: join_lines}
        result:
          - for_each: OBSERVATION
            when: OBX-2 != TX
            fields:
              code: {from: OBX-3, format: cwe_to_codeable_concept}
              value: {from: OBX-5.2}
        """,
        output="fhir",
    )
    (out,) = m.run(Message.parse(ORU))
    assert out["text"] == "CT head:\nNo acute findings.\nNORMAL^Normal^LOCAL"
    assert out["result"] == [
        {"code": {"coding": [{"code": "IMP", "display": "Impression"}], "text": "Impression"}, "value": "Normal"}
    ]


def test_repeated_item_problems_are_reported(write_mapping):
    from engine.mapping import MappingConfigError, load_mapping

    text = """
    name: x
    input: hl7v2
    output: json
    fields:
      result:
        - for_each: VISIT
          colour: red
          fields: {a: {from: OBX-5}}
        - for_each: OBSERVATION
    """
    with pytest.raises(MappingConfigError) as err:
        load_mapping(write_mapping(text))
    keys = {p.key for p in err.value.problems}
    assert {"fields.result[0].for_each", "fields.result[0].colour", "fields.result[1]"} <= keys
