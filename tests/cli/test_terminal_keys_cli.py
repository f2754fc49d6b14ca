"""Terminal safety of `engine messages` and the `engine keys` commands."""

from __future__ import annotations

import base64
import os
import pty
import select as io_select
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import insert

from engine.store import crypto

from .conftest import MESSAGES, engine_env

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "engine.yaml")
KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()
# a hostile sender: ESC sequences (retitle, clear screen), BEL, a C1 CSI (U+009B), a byte that is not UTF-8
HOSTILE = (b"MSH|^~\\&|RIS|RADIOLOGY|ENGINE|HOSPITAL|20261124153000||ORM^O01|C\x1b[2J1|P|2.3.1\r"
           b"PID|1||100234^^^HOSP^MR||Doe\x1b]0;owned\x07^Jane\xc2\x9b31m\xff\r")
TERMINAL_CONTROLS = ("\x1b", "\x07", "\x9b", "\x00")


@pytest.fixture(autouse=True)
def no_keyring_left_behind() -> Iterator[None]:
    crypto.configure(None)
    yield
    crypto.configure(None)


def add_hostile(cli, raw: bytes = HOSTILE) -> int:  # type: ignore[no-untyped-def]
    with cli.db.begin() as conn:
        mid = conn.execute(insert(MESSAGES).values(
            channel="ris-orders", control_id="C\x1b[2J1", message_type="ORM^O01", patient_id="100234", raw=raw,
            status="error", received_at=datetime(2026, 11, 25, 10, 0, tzinfo=UTC), error="bad \x1b[31m value",
            ack="MSH|^~\\&|ENGINE||RIS||20261124153001||ACK|1|P|2.3.1\rMSA|AE|C\x1b[2J1\r", flags="", warnings="",
        )).inserted_primary_key[0]
    return int(mid)


def test_show_and_list_print_no_control_characters(cli) -> None:  # type: ignore[no-untyped-def]
    mid = add_hostile(cli)
    out = cli("messages", "show", str(mid), "-c", CONFIG).stdout
    assert not any(c in out for c in TERMINAL_CONTROLS), repr(out)
    # no MSH-18 and not UTF-8: read as Windows-1252 (so C2 9B is "Â›"); the ESC and BEL are tagged
    assert "Doe<ESC>]0;owned<BEL>^Jane\u00c2\u203a31m\u00ff" in out
    assert "control_id=C<ESC>[2J1" in out and "MSA|AE|C<ESC>[2J1" in out and "bad <ESC>[31m value" in out
    assert "PID|1||100234^^^HOSP^MR||Doe" in out.replace("\n", "")  # segment breaks shown as line breaks
    listed = cli("messages", "-c", CONFIG).stdout
    assert not any(c in listed for c in TERMINAL_CONTROLS) and "<ESC>" in listed
    as_json = cli("messages", "--json", "-c", CONFIG).stdout  # JSON escapes them itself
    assert "\x1b" not in as_json and "\\u001b" in as_json


def test_raw_writes_the_exact_bytes_to_a_pipe(cli) -> None:  # type: ignore[no-untyped-def]
    mid = add_hostile(cli)
    result = cli("messages", "show", str(mid), "--raw", "-c", CONFIG)
    assert result.stdout_bytes == HOSTILE


def test_raw_refuses_a_terminal(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mid = add_hostile(cli)
    env = {**os.environ, **engine_env(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("ENGINE_CONFIG", None)
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "engine", "messages", "show", str(mid), "--raw", "-c", CONFIG],
                              stdout=slave, stderr=subprocess.PIPE, env=env, timeout=120, cwd=ROOT)
        shown = b""
        while io_select.select([master], [], [], 0)[0]:
            shown += os.read(master, 65536)
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 1
    assert b"stdout is a terminal" in proc.stderr and b"--raw > message.hl7" in proc.stderr
    assert b"\x1b]0;owned" not in shown and b"Doe" not in shown


def test_keys_new_status_rotate_and_a_wrong_key(cli) -> None:  # type: ignore[no-untyped-def]
    new = cli("keys", "new").stdout.strip()
    assert len(base64.b64decode(new, validate=True)) == 32
    mid = cli.add_message()  # stored before a key was set
    cli.env["ENGINE_KEY"] = KEY_A
    a_id = crypto.key_id(b"a" * 32).hex()
    status = cli("keys", "status", "-c", CONFIG).stdout
    assert f"current key id: {a_id}" in status and "clear" in status
    assert "messages.raw: 1 value(s) re-encrypted" in cli("keys", "rotate", "-c", CONFIG).stdout
    with cli.db.connect() as conn:
        stored = conn.execute(MESSAGES.select().where(MESSAGES.c.id == mid)).mappings().one()
    assert b"Doe^Jane" not in stored["raw"] and crypto.stored_key_id(stored["raw"]) == a_id
    assert "PID-5: Doe^Jane" in cli("messages", "show", str(mid), "-c", CONFIG).stdout

    cli.env["ENGINE_KEY"] = KEY_B  # the wrong key: refused, by key id, before anything is read
    wrong = cli("messages", "show", str(mid), "-c", CONFIG, code=1)
    assert f"sealed with key id {a_id}" in cli.flat(wrong.stderr) and KEY_B not in wrong.output
    cli.env["ENGINE_KEY"] = "not-a-key"
    bad = cli("messages", "-c", CONFIG, code=1)
    assert "ENGINE_KEY is not valid base64" in cli.flat(bad.stderr) and "not-a-key" not in bad.output

    cli.env["ENGINE_KEY"], cli.env["ENGINE_KEY_OLD"] = KEY_B, KEY_A
    assert "messages.raw: 1 value(s) re-encrypted" in cli("keys", "rotate", "-c", CONFIG).stdout
    cli.env["ENGINE_KEY_OLD"] = None
    b_id = crypto.key_id(b"b" * 32).hex()
    status = cli("keys", "status", "-c", CONFIG).stdout
    assert f"{b_id} (current)" in status and a_id not in status and "clear" not in status
    assert "PID-5: Doe^Jane" in cli("messages", "show", str(mid), "-c", CONFIG).stdout
    cli.env["ENGINE_KEY"] = None
    no_key = cli("keys", "rotate", "-c", CONFIG, code=1)
    assert "no key to rotate to" in cli.flat(no_key.stderr)
