"""Helpers for mapping tests: write a mapping file (and tables) into tmp_path and load it."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.hl7.er7 import Message
from engine.mapping import Mapping, load_mapping

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"
MAPPINGS = ROOT / "mappings"

ORM = "\r".join(
    [
        "MSH|^~\\&|RIS|RAD|ENGINE|HOSP|20261124153000||ORM^O01|C1|P|2.3.1",
        "PID|1||100234^^^HOSP^MR~555^^^OTHER^PI||O\\S\\Brien^Mary^Ann^Jr^Dr||19800512|F",
        "PV1|1|O|RAD|||||4711^House^Gregory^^^Dr||RAD|||||||||V1^^^HOSP^VN",
        "ORC|NW|PL1^RIS|FL1^PACS||SC||^^^202611251000^^S",
        "OBR|1|PL1^RIS|FL1^PACS|CTHEAD^CT Head^LOCAL||||||||||||||ACC1|RP1|SPS1||||CT",
    ]
)


@pytest.fixture
def orm() -> str:
    """A one-order ORM^O01 (v2.3.1) with an escaped family name and two patient IDs."""
    return ORM


@pytest.fixture
def two_orders() -> str:
    return (
        ORM
        + "\r"
        + "\r".join(
            [
                "ORC|NW|PL2^RIS|FL2^PACS||SC",
                "OBR|2|PL2^RIS|FL2^PACS|MRKNEE^MR Knee^LOCAL||||||||||||||ACC2|RP2|SPS2||||MR",
            ]
        )
    )


@pytest.fixture
def msg() -> Message:
    return Message.parse(ORM)


@pytest.fixture
def write_mapping(tmp_path: Path) -> Callable[..., Path]:
    """Write YAML (dedented) as mappings/<name> under tmp_path; tables go to mappings/tables."""

    def write(yaml_text: str, name: str = "m.yaml", tables: dict[str, str] | None = None) -> Path:
        folder = tmp_path / "mappings"
        (folder / "tables").mkdir(parents=True, exist_ok=True)
        for tname, content in (tables or {}).items():
            (folder / "tables" / tname).write_text(content, encoding="utf-8")
        path = folder / name
        path.write_text(textwrap.dedent(yaml_text).lstrip("\n"), encoding="utf-8")
        return path

    return write


@pytest.fixture
def mapping(write_mapping: Callable[..., Path]) -> Callable[..., Mapping]:
    """Build a mapping from a `fields:` body (and optional header lines) and load it."""

    def build(fields: str, header: str = "", tables: dict[str, str] | None = None, output: str = "json") -> Mapping:
        text = f"name: t\ninput: hl7v2\noutput: {output}\n{textwrap.dedent(header)}fields:\n"
        text += textwrap.indent(textwrap.dedent(fields).strip("\n"), "  ") + "\n"
        return load_mapping(write_mapping(text, tables=tables))

    return build
