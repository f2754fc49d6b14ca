"""A second input kind is one adapter and one source: a test-only JSON-lines protocol goes
through the real pipeline, writer and delivery queue into the `file` destination, and the
adapter answers refusals in its own protocol. Also: `engine check` rejects a destination that
cannot take what the channel gives it."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import select

from engine.configfile import ConfigError
from engine.runtime.app import EngineApp, default_registry
from engine.runtime.config import load_config
from engine.runtime.registry import Registry
from engine.store.models import Delivery
from engine.store.models import Message as StoredMessage

MESSAGES = StoredMessage.__table__  # type: ignore[attr-defined]  # SQLModel sets __table__
DELIVERIES = Delivery.__table__  # type: ignore[attr-defined]


def _jsonline() -> ModuleType:
    spec = importlib.util.spec_from_file_location("jsonline", Path(__file__).with_name("jsonline.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["jsonline"] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


def registry() -> Registry:
    reg = default_registry()
    _jsonline().register(reg)
    return reg


def write_config(tmp_path: Path, channel: str, mapping: str | None = None) -> Path:
    (tmp_path / "channels").mkdir(parents=True, exist_ok=True)
    (tmp_path / "mappings").mkdir(exist_ok=True)
    (tmp_path / "engine.yaml").write_text(
        f"storage:\n  url: sqlite:///{tmp_path / 'e.db'}\ndicom:\n  enabled: false\n"
        "delivery:\n  poll_interval_seconds: 0.05\n"
    )
    (tmp_path / "channels" / "notes.yaml").write_text(channel)
    if mapping is not None:
        (tmp_path / "mappings" / "m.yaml").write_text(mapping)
    return tmp_path / "engine.yaml"


CHANNEL = """\
name: notes
source: {type: jsonline, port: 0}
input: {type: json-test, strict: true}
accept: [Note]
destinations:
  - {name: out, type: file, directory: out, content: raw}
"""


async def talk(port: int, lines: list[bytes]) -> list[dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    for line in lines:
        writer.write(line + b"\n")
        await writer.drain()
        answers.append(json.loads(await asyncio.wait_for(reader.readline(), 20)))
    writer.close()
    await writer.wait_closed()
    return answers


async def wait_done(app: EngineApp, count: int) -> list[dict[str, object]]:
    assert app.db is not None
    for _ in range(400):
        with app.db.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(select(DELIVERIES))]
        if len(rows) >= count and all(r["state"] == "done" for r in rows):
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError(f"deliveries not done: {rows}")


async def test_json_units_flow_through_the_real_pipeline(tmp_path: Path) -> None:
    reg = registry()
    app = EngineApp(load_config(write_config(tmp_path, CHANNEL), reg, env={}), reg)
    await app.start()
    try:
        port = app.port_of("notes")
        note = json.dumps({"id": "n1", "kind": "Note", "patient": "P1", "note": "short"}).encode()
        long_note = json.dumps({"id": "n2", "kind": "Note", "patient": "P1", "note": "x" * 40}).encode()
        other = json.dumps({"id": "n3", "kind": "Invoice"}).encode()
        answers = await talk(port, [note, b"{not json", other, long_note, note])
        assert answers[0] == {"id": "n1", "status": "processed"}
        assert answers[1] == {"status": "refused", "error": "not a JSON object"}
        assert answers[2]["status"] == "error"
        assert answers[2]["error"] == {"code": 200, "at": "kind", "text": "message type Invoice is not accepted "
                                       "on channel notes"}
        assert answers[3] == {"id": "n2", "status": "processed", "warnings": ["note"]}
        assert answers[4] == answers[0]  # a resend: the stored answer, not applied again

        rows = await wait_done(app, 2)
        assert len(rows) == 2  # n1 and n2 only: refusals and the resend queue nothing
        written = sorted((tmp_path / "out").glob("*.json"))
        assert [json.loads(p.read_bytes())["id"] for p in written] == ["n1", "n2"]
        assert app.db is not None
        with app.db.connect() as conn:
            stored = [dict(r._mapping) for r in conn.execute(select(MESSAGES).order_by(MESSAGES.c.id))]
        assert [r["status"] for r in stored] == ["processed", "error", "error", "processed", "duplicate"]
        assert stored[1]["raw"] == b"{not json"  # stored as received even though it did not parse
        assert json.loads(stored[3]["warnings"])[0]["location"] == "note"
        assert stored[0]["patient_id"] == "P1" and stored[0]["control_id"] == "n1"
    finally:
        await app.stop()


def problems(tmp_path: Path, channel: str, mapping: str | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, channel, mapping), registry(), env={})
    return [str(p) for p in info.value.problems]


def test_a_destination_that_cannot_take_the_input_is_a_config_error(tmp_path: Path) -> None:
    channel = CHANNEL + "  - {name: fwd, type: mllp, host: 127.0.0.1, port: 6661}\n  - {name: wl, type: worklist}\n"
    shown = problems(tmp_path, channel)
    assert any(s.startswith("channels/notes.yaml:7:") and "'fwd' (mllp) forwards hl7v2 as received" in s
               for s in shown), shown
    assert any(s.startswith("channels/notes.yaml:8:") and "'wl' (worklist) takes dicom outputs, but Note has no "
               "mapping" in s for s in shown), shown


def test_a_mapping_of_another_output_or_input_is_a_config_error(tmp_path: Path) -> None:
    mapping = "name: m\ninput: hl7v2\noutput: json\nfields:\n  x: {from: PID-3.1}\n"
    channel = """\
name: notes
source: {type: mllp, port: 0}
accept: [ORM^O01]
mappings: {ORM^O01: m.yaml}
destinations:
  - {name: wl, type: worklist}
"""
    shown = problems(tmp_path, channel, mapping)
    assert any("'wl' (worklist) takes dicom outputs, but mapping m for ORM^O01 makes json" in s for s in shown), shown
    json_channel = CHANNEL.replace("accept: [Note]", "accept: [Note]\nmappings: {Note: m.yaml}")
    shown = problems(tmp_path / "j", json_channel, mapping)
    assert any("mapping m reads hl7v2 input, but this channel's input is json-test" in s for s in shown), shown


def test_moved_keys_and_every_stage_reported_at_once(tmp_path: Path) -> None:
    channel = """\
name: orders
source: {type: mllp, port: 99999}
validate: true
charset: 8859/1
acept: [ORM^O01]
input: {type: hl7v2, validat: true}
mappings: {ORM^O01: nosuch.yaml}
"""
    shown = problems(tmp_path, channel)
    expected = [
        "channels/notes.yaml:2:",  # port out of range
        "channels/notes.yaml:3:1 validate: this key has moved: write it as input.validate",
        "channels/notes.yaml:4:1 charset: this key has moved: write it as input.charset",
        "channels/notes.yaml:5:1 acept: unknown key; did you mean 'accept'?",
        "channels/notes.yaml:6:",  # input.validat
        "channels/notes.yaml:7:",  # the missing mapping file, though the stages above failed
    ]
    assert len(shown) == len(expected), shown
    for want, got in zip(expected, shown, strict=True):
        assert got.startswith(want), (want, shown)
    assert "did you mean 'validate'?" in shown[4] and "nosuch.yaml does not exist" in shown[5]
