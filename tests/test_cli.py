"""The CLI as an analyst uses it, against `engine run` in another process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "hl7"


def test_send_messages_show_and_replay(engine_process, tmp_path: Path) -> None:
    engine_process.start()
    orders = f"localhost:{engine_process.orders_port}"
    results = f"localhost:{engine_process.results_port}"

    single = engine_process.cli("send", str(SAMPLES / "oru_r01.hl7"), "--to", results)
    assert "MSA|AA|ORU0001" in single.stdout  # the ACK is printed

    many = engine_process.cli("send", str(SAMPLES / "batch.hl7"), str(SAMPLES / "orm_o01_ct.hl7"), "--to", orders,
                              "-n", "2")
    assert "sent=4" in many.stdout and "AA=4" in many.stdout and "rate=" in many.stdout

    rejected = engine_process.cli("send", str(SAMPLES / "adt_a08.hl7"), "--to", results, check=False)
    assert rejected.returncode == 1 and "MSA|AR" in rejected.stdout

    listed = [json.loads(line) for line in engine_process.cli("messages", "--json").stdout.splitlines()]
    assert len(listed) == 6
    assert {"id", "channel", "control_id", "message_type", "status", "received_at"} <= set(listed[0])
    assert [m["id"] for m in listed] == sorted((m["id"] for m in listed), reverse=True)  # newest first
    errors = [json.loads(line) for line in engine_process.cli("messages", "--status", "error", "--json")
              .stdout.splitlines()]
    assert [(m["channel"], m["message_type"]) for m in errors] == [("ris-results", "ADT^A08")]
    by_type = engine_process.cli("messages", "--type", "ORM^O01", "--channel", "ris-orders", "--json").stdout
    assert len(by_type.splitlines()) == 4
    assert engine_process.cli("messages", "--control-id", "ORU0001", "--json").stdout.count("\n") == 1
    assert "ris-results" in engine_process.cli("messages", "--since", "2020-01-01").stdout

    oru_id = next(m["id"] for m in listed if m["control_id"] == "ORU0001")
    shown = engine_process.cli("messages", "show", str(oru_id)).stdout
    assert "OBR-4:" in shown and "MSA|AA|ORU0001" in shown and "outbox" in shown

    items = [json.loads(line) for line in engine_process.cli("worklist", "--json").stdout.splitlines()]
    assert {i["accession_number"] for i in items} == {"ACC1001", "ACC5001", "ACC5011", "ACC5021"}
    assert all(i["status"] == "SCHEDULED" for i in items)
    assert "ACC1001" in engine_process.cli("worklist", "--modality", "CT").stdout

    replayed = engine_process.cli("messages", "replay", str(errors[0]["id"]), "--reprocess").stdout
    assert f"{errors[0]['id']}: reprocessed as message" in replayed and "status error" in replayed
    again = [json.loads(line) for line in engine_process.cli("messages", "--json").stdout.splitlines()]
    assert again[0]["replay_of"] == errors[0]["id"]


def test_check_reports_every_problem_and_run_refuses(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "engine", "check", "-c", str(ROOT / "engine.yaml")],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "channels").mkdir()
    (tmp_path / "mappings").mkdir()
    (tmp_path / "engine.yaml").write_text("dicom:\n  aetitle: X\n")
    (tmp_path / "channels" / "a.yaml").write_text("name: a\nsource:\n  type: mllp\n  port: 2599\n  tsl: {}\n"
                                                  "mappings:\n  ORM^O01: missing.yaml\n")
    for command in ("check", "run"):
        bad = subprocess.run([sys.executable, "-m", "engine", command, "-c", str(tmp_path / "engine.yaml")],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert bad.returncode == 1
        assert "engine.yaml:2:3 dicom.aetitle: unknown key" in bad.stderr
        assert "channels/a.yaml:5:3 source.tsl: unknown key" in bad.stderr
        assert "channels/a.yaml:7:3 mappings.ORM^O01: mapping file mappings/missing.yaml does not exist" in bad.stderr


def test_map_prints_a_worklist_item_and_checks_examples() -> None:
    out = subprocess.run([sys.executable, "-m", "engine", "map", "mappings/orm-to-worklist.yaml",
                          str(SAMPLES / "orm_o01_ct.hl7")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Accession Number" in out.stdout and "ACC1001" in out.stdout
    checked = subprocess.run([sys.executable, "-m", "engine", "map", "--check"], capture_output=True, text=True,
                             cwd=ROOT, timeout=120)
    assert checked.returncode == 0, checked.stderr
    assert "orm-to-worklist.yaml: OK" in checked.stdout
