"""`engine messages`: validated filters, --warnings, show/replay exit codes, revive by default."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select

from engine.store.models import Message

MESSAGES = Message.__table__  # type: ignore[attr-defined]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "engine.yaml")
WARNING = {"text": "value too long for SH, cut", "code": 102, "location": "OBR-18",
           "source": "mappings/orm-to-worklist.yaml:36", "target": "AccessionNumber"}


def test_filters_refuse_unknown_values_and_name_the_known_ones(cli) -> None:
    cli.add_message()
    bad = cli("messages", "--status", "bogus", "-c", CONFIG, code=2)
    assert "'bogus' is not one of: processed, filtered, error, duplicate" in cli.flat(bad.stderr)
    bad = cli("messages", "--channel", "nosuch", "-c", CONFIG, code=2)
    known = "emr-medications-poll, emr-medications, pacs-studies, ris-orders, ris-results"
    assert f"no channel 'nosuch'; configured: {known}" in cli.flat(bad.stderr)
    bad = cli("messages", "--since", "25.11.2026", "-c", CONFIG, code=2)
    assert "is not a date" in cli.flat(bad.stderr)
    assert len(cli("messages", "--channel", "ris-orders", "--status", "processed", "--json", "-c", CONFIG)
               .stdout.splitlines()) == 1


def test_a_channel_no_longer_configured_still_lists_its_stored_messages(cli) -> None:
    cli.add_message(channel="old-feed")
    rows = cli("messages", "--channel", "old-feed", "--json", "-c", CONFIG).stdout.splitlines()
    assert [json.loads(r)["channel"] for r in rows] == ["old-feed"]


def test_iso_and_hl7_dates_alike(cli) -> None:
    cli.add_message(control_id="OLD", received_at=datetime(2026, 11, 24, 9, 0, tzinfo=UTC))
    cli.add_message(control_id="NEW", received_at=datetime(2026, 11, 25, 10, 0, tzinfo=UTC))
    for since in ("2026-11-25", "20261125", "2026-11-25T00:00", "202611250000"):
        out = cli("messages", "--since", since, "--json", "-c", CONFIG).stdout
        assert [json.loads(r)["control_id"] for r in out.splitlines()] == ["NEW"], since
    for until in ("2026-11-25", "20261125"):
        out = cli("messages", "--until", until, "--json", "-c", CONFIG).stdout
        assert [json.loads(r)["control_id"] for r in out.splitlines()] == ["OLD"], until


def test_worklist_date_takes_iso_and_hl7_and_status_is_checked(cli) -> None:
    assert cli("worklist", "--date", "2026-11-25", "-c", CONFIG).exit_code == 0
    assert cli("worklist", "--date", "20261125", "-c", CONFIG).exit_code == 0
    assert "is not a date" in cli.flat(cli("worklist", "--date", "2026-13-45", "-c", CONFIG, code=2).stderr)
    bad = cli("worklist", "--status", "bogus", "-c", CONFIG, code=2)
    assert "SCHEDULED, IN PROGRESS, CANCELLED, DISCONTINUED, COMPLETED" in cli.flat(bad.stderr)


def test_warnings_filter_count_json_and_show(cli) -> None:
    plain = cli.add_message(control_id="PLAIN")
    warned = cli.add_message(control_id="WARNED", warnings=[WARNING, {**WARNING, "location": "OBR-4"}])
    rows = [json.loads(r) for r in cli("messages", "--warnings", "--json", "-c", CONFIG).stdout.splitlines()]
    assert [r["id"] for r in rows] == [warned]
    assert rows[0]["warnings"][0] == WARNING  # a list of objects, not a JSON string
    every = {json.loads(r)["id"]: json.loads(r)["warnings"]
             for r in cli("messages", "--json", "-c", CONFIG).stdout.splitlines()}
    assert every[plain] == [] and len(every[warned]) == 2
    table = cli("messages", "-c", CONFIG).stdout
    assert "warnings" in table
    cells = [c.strip() for c in next(line for line in table.splitlines() if "WARNED" in line).split("│")]
    assert cells[6:8] == ["processed", "2"]  # status, then the warnings count
    shown = cli("messages", "show", str(warned), "-c", CONFIG).stdout
    assert "warnings: 2" in shown
    assert ("value too long for SH, cut at OBR-18 -> AccessionNumber (mappings/orm-to-worklist.yaml:36) [code 102]"
            in shown)
    assert "warnings:" not in cli("messages", "show", str(plain), "-c", CONFIG).stdout


def test_show_and_replay_of_a_missing_message_exit_1(cli) -> None:
    assert "no message 999" in cli("messages", "show", "999", "-c", CONFIG, code=1).stderr
    assert "no message 999" in cli("messages", "replay", "999", "-c", CONFIG, code=1).stderr
    mid = cli.add_message(dead=1)
    both = cli("messages", "replay", str(mid), "999", "-c", CONFIG, code=1)
    assert f"{mid}: 1 dead delivery queued again" in both.stdout and "no message 999" in both.stderr


def test_replay_revives_dead_deliveries_by_default_and_nothing_else(cli) -> None:
    from engine.store.queue import deliveries_for

    dead = cli.add_message(control_id="DEAD", dead=2, done=1)
    fine = cli.add_message(control_id="FINE", done=1)
    out = cli("messages", "replay", str(dead), str(fine), "-c", CONFIG).stdout
    assert f"{dead}: 2 dead deliveries queued again" in out
    assert f"{fine}: no dead deliveries; nothing changed" in out
    assert sorted(d["state"] for d in deliveries_for(cli.db, dead)) == ["done", "pending", "pending"]
    assert [d["state"] for d in deliveries_for(cli.db, fine)] == ["done"]
    with cli.db.connect() as conn:  # no message was reprocessed
        assert conn.execute(select(func.count()).select_from(MESSAGES)).scalar() == 2


def test_replay_reprocess_is_explicit(cli) -> None:
    mid = cli.add_message(control_id="AGAIN", done=1)
    out = cli("messages", "replay", str(mid), "--reprocess", "-c", CONFIG).stdout
    assert f"{mid}: reprocessed as message" in out
    rows = [json.loads(r) for r in cli("messages", "--json", "-c", CONFIG).stdout.splitlines()]
    assert rows[0]["replay_of"] == mid


def test_config_before_or_after_the_subcommand(cli, tmp_path: Path) -> None:
    """A config of its own (another channel name): only honoured -c options can find that channel."""
    conf = tmp_path / "conf"
    (conf / "channels").mkdir(parents=True)
    (conf / "mappings").mkdir()
    (conf / "engine.yaml").write_text(f"storage:\n  url: {cli.db_url}\ndicom:\n  enabled: false\n")
    (conf / "channels" / "lab.yaml").write_text("name: lab-feed\nsource:\n  type: mllp\n  port: 0\n")
    mine = str(conf / "engine.yaml")
    mid = cli.add_message(channel="lab-feed-stored")
    for args in (["-c", mine, "messages", "--channel", "lab-feed"],
                 ["messages", "-c", mine, "--channel", "lab-feed"],
                 ["messages", "--channel", "lab-feed", "-c", mine]):
        assert cli(*args).exit_code == 0, args
    assert cli("messages", "--channel", "lab-feed", "-c", CONFIG, code=2)  # the shipped config has no such channel
    for args in (["-c", mine, "messages", "show", str(mid)], ["messages", "-c", mine, "show", str(mid)],
                 ["messages", "show", str(mid), "-c", mine], ["messages", "replay", str(mid), "-c", mine],
                 ["worklist", "-c", mine], ["-c", mine, "worklist"], ["check", "-c", mine], ["-c", mine, "check"]):
        assert cli(*args).exit_code == 0, args
    # the nearest -c wins
    assert cli("-c", CONFIG, "messages", "--channel", "lab-feed", "-c", mine).exit_code == 0
    cli.env["ENGINE_CONFIG"] = mine  # then $ENGINE_CONFIG, below any -c
    assert cli("messages", "--channel", "lab-feed").exit_code == 0
    assert cli("messages", "--channel", "lab-feed", "-c", CONFIG, code=2)
