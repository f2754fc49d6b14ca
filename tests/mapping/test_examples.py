"""`examples:` inside a mapping, as `engine map --check` runs them."""

from __future__ import annotations

from engine.mapping import check_examples, load_mapping, map_message, render_warnings
from engine.mapping.examples import example_message, subset_diffs

HEAD = """
name: ex
input: hl7v2
output: json
for_each: ORDER
fields:
  order: {from: ORC-1, required: true}
  acc: {from: OBR-18}
  codes:
    - {from: OBR-4, format: cwe_to_code_item}
examples:
"""


def test_passing_examples_inline_and_from_file(write_mapping, tmp_path, orm):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "orm.hl7").write_bytes(orm.encode())
    text = (
        HEAD
        + """
  - message: samples/orm.hl7
    expect: [{order: NW, acc: ACC1, codes: [{CodeValue: CTHEAD}]}]
  - message: |
      MSH|^~\\&|RIS|RAD|ENGINE|HOSP|20261124153000||ORM^O01|C9|P|2.3.1
      ORC|CA|PL1
      OBR|1|PL1||||||||||||||||ACC9
    expect: {order: CA, acc: ACC9, codes: []}
  - message: |
      MSH|^~\\&|RIS|RAD|ENGINE|HOSP|20261124153000||ORM^O01|C9|P|2.3.1
      ORC||PL1
      OBR|1|PL1
    error: {code: 101, location: ORC-1, text: order}
"""
    )
    m = load_mapping(write_mapping(text))
    assert check_examples(m) == []


def test_failing_examples_say_where_and_what(write_mapping, orm):
    text = (
        HEAD
        + """
  - message: |
      MSH|^~\\&|RIS|RAD|ENGINE|HOSP|20261124153000||ORM^O01|C9|P|2.3.1
      ORC|NW|PL1
      OBR|1|PL1||||||||||||||||ACC9
    expect: {order: CA, missing: x}
  - message: samples/none.hl7
    expect: {}
  - message: |
      MSH|^~\\&|RIS|RAD|ENGINE|HOSP|20261124153000||ORM^O01|C9|P|2.3.1
      ORC||PL1
      OBR|1|PL1
    expect: {order: NW}
  - message: |
      MSH|^~\\&|RIS|RAD|ENGINE|HOSP|20261124153000||ORM^O01|C9|P|2.3.1
      ORC|NW|PL1
      OBR|1|PL1
    error: {code: 101}
  - message: |
      MSH|^~\\&|RIS|RAD|ENGINE|HOSP|20261124153000||ORM^O01|C9|P|2.3.1
      ORC||PL1
      OBR|1|PL1
    error: {code: 103, location: ORC-2}
  - message: |
      MSH|^~\\&|RIS|RAD|ENGINE|HOSP|20261124153000||ORM^O01|C9|P|2.3.1
      ORC|NW|PL1
      OBR|1|PL1
    expect: [{order: NW}, {order: NW}]
"""
    )
    m = load_mapping(write_mapping(text))
    failures = check_examples(m)
    joined = "\n".join(failures)
    assert "m.yaml:12:5 examples.0: example 1: output[0].order: expected 'CA', got 'NW'" in joined
    assert "example 1: output[0].missing: missing" in joined
    assert "example 2: cannot read the message" in joined
    assert "example 3: mapping refused the message" in joined and "code 101" in joined
    assert "example 4: expected a refusal" in joined
    assert "example 5: error code: expected 103, got 101" in joined
    assert "example 5: error location: expected ORC-2, got ORC-1" in joined
    assert "example 6: expected 2 output(s), got 1" in joined
    assert len(failures) == 8


def test_subset_rules():
    assert subset_diffs({"a": 1}, {"a": "1", "b": 2}, "o") == []  # unquoted YAML numbers match digit text
    assert subset_diffs({"t": 93000}, {"t": "093000"}, "o") == []
    assert subset_diffs({"a": None}, {}, "o") == []
    assert subset_diffs({"a": [{"x": 1}]}, {"a": [{"x": "2"}]}, "o") == ["o.a[0].x: expected 1, got '2'"]
    assert subset_diffs({"a": True}, {"a": "True"}, "o") != []


def test_examples_can_expect_warnings_and_map_message_returns_them(write_mapping):
    text = """
name: ex
input: hl7v2
output: json
fields:
  sex: {from: PID-8, format: sex_to_dicom}
examples:
  - message: |
      MSH|^~\\&|RIS|RAD|ENGINE|HOSP|20261124153000||ADT^A08|C9|P|2.5.1
      PID|1||1||X||19800101|M-
    expect: {sex: ""}
    warnings: [{code: 103, location: PID-8, target: sex, text: table 0001}]
  - message: |
      MSH|^~\\&|RIS|RAD|ENGINE|HOSP|20261124153000||ADT^A08|C9|P|2.5.1
      PID|1||1||X||19800101|F
    expect: {sex: F}
    warnings: [{code: 103}]
"""
    m = load_mapping(write_mapping(text))
    (failure,) = check_examples(m)
    assert "example 2: expected a warning" in failure and "got none" in failure
    outputs, warnings = map_message(m, example_message(m, m.examples[0]))
    assert outputs == [{"sex": ""}] and len(warnings) == 1
    assert render_warnings(warnings) == (
        "warning 103 at PID-8 (sex): administrative sex is not in HL7 table 0001 (M F O U A N); value dropped"
        " [mappings/m.yaml:5]"
    )
