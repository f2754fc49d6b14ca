"""`engine map`: --charset, a warning for a message type the mapping is not used for, one-line failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "hl7"
ORM_MAPPING = str(ROOT / "mappings" / "orm-to-worklist.yaml")
CONFIG = str(ROOT / "engine.yaml")


@pytest.fixture
def undeclared_latin1(tmp_path: Path) -> Path:
    """The Latin-1 sample without its MSH-18: what many senders really do."""
    path = tmp_path / "undeclared.hl7"
    path.write_bytes((SAMPLES / "orm_latin1.hl7").read_bytes().replace(b"|8859/1", b""))
    return path


def test_undeclared_latin1_maps_with_a_warning_and_charset_maps_it_silently(cli, undeclared_latin1: Path) -> None:
    guessed = cli("map", ORM_MAPPING, str(undeclared_latin1), "-c", CONFIG)
    assert "Weiß^Käthe" in guessed.stdout  # read as Windows-1252, which Latin-1 letters share
    lines = guessed.stderr.strip().splitlines()
    assert len(lines) == 1 and "102 at MSH-18" in lines[0] and "not UTF-8" in lines[0]
    good = cli("map", ORM_MAPPING, str(undeclared_latin1), "--charset", "latin-1", "-c", CONFIG)
    assert good.stderr == ""
    assert "ACC4001" in good.stdout and "Weiß^Käthe" in good.stdout
    assert "unknown character set 'nosuch'" in cli("map", ORM_MAPPING, str(undeclared_latin1), "--charset",
                                                   "nosuch", "-c", CONFIG, code=1).stderr


def test_a_message_type_the_mapping_is_not_used_for_is_one_warning_line(cli) -> None:
    out = cli("map", ORM_MAPPING, str(SAMPLES / "oru_r01.hl7"), "-c", CONFIG)
    warning = [line for line in out.stderr.splitlines() if line.startswith("warning")]
    assert warning == [f"warning {SAMPLES / 'oru_r01.hl7'} is ORU^R01; orm-to-worklist.yaml takes ORM^O01, OMI^O23 "
                       "(channel ris-orders)"]
    ok = cli("map", ORM_MAPPING, str(SAMPLES / "omi_o23.hl7"), "-c", CONFIG)
    assert ok.stderr == "" and "ACC3001" in ok.stdout


@pytest.mark.parametrize("case", ["not-hl7", "missing-sample", "missing-mapping", "empty"])
def test_every_failure_is_one_line_and_exit_1_never_a_traceback(case: str, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("Dear colleague,\nplease find attached\n")
    (tmp_path / "empty.hl7").write_bytes(b"")
    args = {
        "not-hl7": [ORM_MAPPING, str(tmp_path / "notes.txt")],
        "missing-sample": [ORM_MAPPING, str(tmp_path / "nothere.hl7")],
        "missing-mapping": [str(tmp_path / "nothere.yaml"), str(SAMPLES / "orm_o01_ct.hl7")],
        "empty": [ORM_MAPPING, str(tmp_path / "empty.hl7")],
    }[case]
    out = subprocess.run([sys.executable, "-m", "engine", "map", *args, "-c", CONFIG], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error "), out.stderr
    expected = {"not-hl7": "no HL7 message found in", "missing-sample": "does not exist",
                "missing-mapping": "does not exist", "empty": "no HL7 message found in"}[case]
    assert expected in lines[0]


def test_a_sample_that_breaks_the_mapping_is_one_line(cli, tmp_path: Path) -> None:
    no_pid = tmp_path / "no_pid.hl7"
    no_pid.write_bytes(b"\r".join(s for s in (SAMPLES / "orm_o01_ct.hl7").read_bytes().split(b"\r")
                                  if not s.startswith(b"PID")))
    out = cli("map", ORM_MAPPING, str(no_pid), "-c", CONFIG, code=1)
    assert len(out.stderr.strip().splitlines()) == 1 and "PID-3" in out.stderr
