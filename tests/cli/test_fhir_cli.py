"""The CLI on the FHIR side: `engine messages polls` (poll_state) and `messages show` of a FHIR resource."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.store.poll_state import record_run


def test_polls_lists_progress_and_failures(cli: Any) -> None:
    cfg = ["-c", str(Path(__file__).resolve().parents[2] / "engine.yaml")]
    empty = cli("messages", "polls", *cfg)
    assert "no poll has run yet" in empty.stdout
    record_run(cli.db, "emr-medications-poll", "MedicationRequest", since="2026-11-30T10:00:00+00:00",
               fetched=130, stored=120, pages=2)
    record_run(cli.db, "emr-medications-poll", "MedicationDispense", since=None, fetched=0, stored=0, pages=0,
               error="HTTP 503")
    shown = cli("messages", "polls", "--channel", "emr-medications-poll", *cfg)
    lines = [line for line in shown.stdout.splitlines() if "Medication" in line]
    assert len(lines) == 2
    assert "MedicationDispense" in lines[0] and "HTTP 503" in lines[0]
    assert "MedicationRequest" in lines[1] and "130" in lines[1] and "120" in lines[1]
    rows = [json.loads(line) for line in cli("messages", "polls", "--json", *cfg).stdout.splitlines()]
    request = next(r for r in rows if r["resource_type"] == "MedicationRequest")
    assert request["runs"] == 1 and request["since"] == "2026-11-30T10:00:00+00:00" and request["last_ok_at"]
    dispense = next(r for r in rows if r["resource_type"] == "MedicationDispense")
    assert dispense["last_error"] == "HTTP 503" and dispense["last_ok_at"] is None and dispense["since"] == ""
    cli("messages", "polls", "--channel", "nosuch", *cfg, code=2)


def test_show_prints_a_fhir_message_as_json(cli: Any) -> None:
    from sqlalchemy import insert

    from engine.store.models import Message

    body = b'{"resourceType":"MedicationStatement","id":"x","status":"active"}'
    with cli.db.begin() as conn:
        mid = conn.execute(insert(Message.__table__).values(  # type: ignore[attr-defined]
            channel="emr-medications", control_id="MedicationStatement/x#1", message_type="MedicationStatement",
            raw=body, status="processed", error="", ack='{"http":201}', flags="", warnings="")).inserted_primary_key[0]
    shown = cli("messages", "show", str(mid), "-c", str(Path(__file__).resolve().parents[2] / "engine.yaml"))
    assert '"resourceType":"MedicationStatement"' in shown.stdout
    assert "not parseable" not in shown.stdout and '{"http":201}' in shown.stdout
