"""`when:` conditions."""

from __future__ import annotations

import pytest

from engine.hl7.er7 import Message
from engine.mapping import compile_condition

MSG = Message.parse(
    "\r".join(
        [
            "MSH|^~\\&|RIS|RAD|ENGINE|HOSP|20261124153000||ORM^O01|C1|P|2.5.1",
            "PID|1||100^^^H~200^^^I||Doe^Jane||19800101|",
            "ORC|CA|PL1",
            "OBR|1|PL1" + "|" * 22 + "MR",
        ]
    )
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ORC-1 == 'CA'", True),
        ('ORC-1 == "CA"', True),
        ("ORC-1 == CA", True),
        ("ORC-1 == NW", False),
        ("ORC-1 != NW", True),
        ("OBR-24 in [CT, MR]", True),
        ("OBR-24 in ['CT']", False),
        ("OBR-24 not in [CT, US]", True),
        ("PID-8 is empty", True),
        ("PID-8 is not empty", False),
        ("ZDS-1 is empty", True),
        ("ORC-1 == CA and OBR-24 == CT", False),
        ("ORC-1 == CA and OBR-24 == CT or PID-5.1 == Doe", True),
        ("ORC-1 == CA and (OBR-24 == CT or PID-5.1 == Doe)", True),
        ("not ORC-1 == CA", False),
        ("PID-3[*].4 == I", True),
        ("PID-3[*].4 in [X, Y]", False),
        ("MSH-12 == 2.5.1", True),
    ],
)
def test_conditions(text, expected):
    assert compile_condition(text)(MSG) is expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "ORC-1",
        "ORC-1 = CA",
        "ORC-1 == CA and",
        "ORC-1 in CA",
        "(ORC-1 == CA",
        "orc1 == CA",
        "ORC-1 is full",
        "ORC-1 == CA OBR-1 == 1",
    ],
)
def test_bad_conditions_raise_value_error(bad):
    with pytest.raises(ValueError):
        compile_condition(bad)
