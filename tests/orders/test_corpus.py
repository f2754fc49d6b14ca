"""Orders as interface teams meet them, each with the worklist items it must give.

tests/orders/<case>.hl7 is one message in a vendor's or a version's dialect; <case>.yaml next to
it says, field by field (DICOM keywords), what the shipped `orm-to-worklist` mapping must make of
it, which warnings it must raise (an optional value dropped or cut: the message still maps) and
the ACK the sender gets. Two tests read them:

- the mapping run directly, as `engine map` does (parse, run, the DICOM value checks when present);
- the shipped engine on free ports: the message over MLLP, the ACK, then the items by C-FIND
  (pynetdicom for every key, dcmtk's findscu for the broad modality query).

The expectations file:
    description: what the dialect does
    needs: [warnings, vr, ...]      # engine features it relies on: xfail (strict) while they are in MISSING
    e2e_needs: [pipeline]            # more features only the end-to-end test relies on
    after: other_case                # end to end: send that case first (a cancel needs its order)
    ack: AA | AE
    error: {code: 101, location: PID-3.1}         # for AE (at_output: true when the DICOM value check refuses)
    warnings: [{location: ORC-7.6, target: RequestedProcedurePriority, code: 103}]
    pipeline_warnings: [{location: MSH-18}]      # end to end only: what the pipeline adds itself
    status: SCHEDULED | CANCELLED | DISCONTINUED  # the items' step status afterwards (end to end)
    items: [{control: {...}, dataset: {...}}]     # one per ORDER group, in order
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]
from ruamel.yaml import YAML
from sqlalchemy import select

from engine.dicom.dataset import dataset_to_item
from engine.errors import ProcessingError
from engine.hl7.er7 import Message
from engine.hl7.mllp import MLLPClient
from engine.mapping import Mapping, load_mapping
from engine.mapping.examples import expect_diffs
from engine.runtime.app import EngineApp
from engine.store.models import Message as StoredMessage
from engine.store.worklist import WorklistItem

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MAPPING = ROOT / "mappings" / "orm-to-worklist.yaml"
FINDSCU = Path("/usr/bin/findscu")
CHANNEL = "ris-orders"
SPS = "ScheduledProcedureStepSequence"
MESSAGES = StoredMessage.__table__  # type: ignore[attr-defined]
ITEMS = WorklistItem.__table__  # type: ignore[attr-defined]

# what each `needs:` name waits for (a YAML's `needs:` lists them; end to end also `e2e_needs:`)
FEATURES = {
    "warnings": "needs ProcessingWarning + on_invalid: drop in the mapping rules (optional values dropped)",
    "iso": "needs ISO-8601 timestamps read where an HL7 DTM is expected, with a warning",
    "vr": "needs DICOM VR checks at the output (engine.dicom.vr, with the mapping's required targets)",
    "groups": "needs order groups owning their Z-segments (no ZDS fallback to another order)",
    "tolerant": "needs tolerant parsing (undeclared Latin-1 decoded as a fallback charset)",
    "pipeline": "needs the pipeline to pass warnings to Mapping.run, check values at the output, store the "
    "warnings with the message and answer them as ERR-4 W in the AA",
}
# Features not merged yet: a case that needs one is xfail (strict). Remove a name once its branch is
# merged (h-mapping: warnings, iso; h-vr: vr; h-er7: groups, tolerant; the lead: pipeline); a case that
# then passes unexpectedly fails as XPASS(strict), which says the mark can go.
MISSING: set[str] = set()


@dataclass
class Case:
    name: str
    raw: bytes
    spec: dict[str, Any]
    needs: list[str] = field(default_factory=list)

    @property
    def ack(self) -> str:
        return str(self.spec.get("ack", "AA"))

    @property
    def items(self) -> list[dict[str, Any]]:
        return list(self.spec.get("items") or [])

    @property
    def warnings(self) -> list[dict[str, Any]]:
        """Warnings the mapping (and the DICOM value checks) must raise."""
        return list(self.spec.get("warnings") or [])

    @property
    def stored_warnings(self) -> list[dict[str, Any]]:
        """End to end: those, plus what the pipeline itself adds (e.g. a guessed charset)."""
        return self.warnings + list(self.spec.get("pipeline_warnings") or [])


def load_cases() -> list[Case]:
    cases = []
    for hl7_file in sorted(HERE.glob("*.hl7")):
        spec_file = hl7_file.with_suffix(".yaml")
        assert spec_file.is_file(), f"{hl7_file.name} has no expectations file {spec_file.name}"
        spec = YAML(typ="safe").load(spec_file.read_text(encoding="utf-8"))
        needs = list(spec.get("needs") or [])
        unknown = [n for n in needs + list(spec.get("e2e_needs") or []) if n not in FEATURES]
        assert not unknown, f"{spec_file.name}: unknown needs {unknown} (known: {sorted(FEATURES)})"
        cases.append(Case(hl7_file.stem, hl7_file.read_bytes(), spec, needs))
    return cases


CASES = load_cases()
BY_NAME = {c.name: c for c in CASES}


def case_needs(case: Case, *, end_to_end: bool) -> list[str]:
    """Features the case waits for; end to end also those of the case sent before it, and the
    pipeline's part whenever a warning must reach the ACK and the store."""
    needs = list(case.needs)
    if not end_to_end:
        return needs
    before = BY_NAME[case.spec["after"]] if case.spec.get("after") else None
    for extra in ([*case_needs(before, end_to_end=True)] if before else []) + list(case.spec.get("e2e_needs") or []):
        if extra not in needs:
            needs.append(extra)
    if case.stored_warnings and "pipeline" not in needs:
        needs.append("pipeline")
    return needs


def params(*, end_to_end: bool) -> list[Any]:
    out = []
    for case in CASES:
        reasons = [FEATURES[n] for n in case_needs(case, end_to_end=end_to_end) if n in MISSING]
        marks = [pytest.mark.xfail(strict=True, reason="; ".join(reasons))] if reasons else []
        out.append(pytest.param(case, id=case.name, marks=marks))
    return out


def test_the_corpus_covers_the_dialects() -> None:
    """At least 30 orders, every one with expectations, every `after:` naming a case."""
    assert len(CASES) >= 30
    for case in CASES:
        assert case.ack in ("AA", "AE"), case.name
        assert case.items or case.ack == "AE", f"{case.name}: an AA case lists the items it must give"
        after = case.spec.get("after")
        assert after is None or after in BY_NAME, f"{case.name}: after {after!r} is not a case"


# -- the mapping, run directly -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mapping() -> Mapping:
    return load_mapping(MAPPING)


def _value_checker() -> Callable[..., Any] | None:
    """The DICOM VR checker (engine.dicom.vr.check_item) once it exists; None before."""
    try:
        from engine.dicom import vr  # type: ignore[attr-defined]  # not merged yet
    except ImportError:
        return None
    return getattr(vr, "check_item", None)


def required_targets(node: Any, prefix: str = "") -> set[str]:
    """Index-free keyword paths of the mapping's `required: true` targets (what the value check keeps)."""
    found: set[str] = set()
    items = node.items() if isinstance(node, dict) else []
    for key, value in items:
        if isinstance(value, dict) and ("from" in value or "default" in value or "value" in value):
            if value.get("required") is True:
                found.add(prefix + key)
        elif isinstance(value, dict):
            found |= required_targets(value, prefix + key + ".")
        elif isinstance(value, list):
            for item in value:
                found |= required_targets(item, prefix + key + ".")
    return found


REQUIRED = frozenset(required_targets(YAML(typ="safe").load(MAPPING.read_text(encoding="utf-8"))["fields"]["dataset"]))


def run_mapping(mapping: Mapping, raw: bytes) -> tuple[list[Any], list[Any]]:
    """What `engine map` does: parse, run (collecting warnings when the mapping can), check values."""
    msg = Message.parse(raw)
    warnings: list[Any] = []
    run: Callable[..., list[Any]] = mapping.run
    if "warnings" in inspect.signature(run).parameters:  # Mapping.run(message, warnings=...) once merged
        outputs = run(msg, warnings=warnings)
    else:
        outputs = run(msg)
    check = _value_checker()
    if check is not None:
        for out in outputs:
            out["dataset"] = check(out["dataset"], required=REQUIRED, warnings=warnings)
    return outputs, warnings


def _plain(target: str) -> str:
    return re.sub(r"\[\d+\]", "", target)


def warning_matches(expected: dict[str, Any], actual: Any) -> bool:
    """An expected warning names a location (this path or one below it), a target keyword and/or a code."""
    got = actual.as_dict() if hasattr(actual, "as_dict") else dict(actual)
    loc = str(expected.get("location", ""))
    if loc and not (got.get("location") == loc or str(got.get("location", "")).startswith(loc + ".")):
        return False
    target = _plain(str(expected.get("target", "")))
    have = _plain(str(got.get("target", "")))
    if target and not (have == target or have.endswith("." + target)):
        return False
    return "code" not in expected or str(got.get("code")) == str(expected["code"])


def warning_diffs(expected: list[dict[str, Any]], actual: list[Any]) -> list[str]:
    """Every expected warning raised, and none that was not expected."""
    diffs = [f"warning not raised: {e}" for e in expected if not any(warning_matches(e, a) for a in actual)]
    for a in actual:
        if not any(warning_matches(e, a) for e in expected):
            shown = a.as_dict() if hasattr(a, "as_dict") else a
            diffs.append(f"unexpected warning: {shown}")
    return diffs


@pytest.mark.parametrize("case", params(end_to_end=False))
def test_mapping_gives_the_expected_items(mapping: Mapping, case: Case) -> None:
    if case.ack == "AE":
        with pytest.raises(ProcessingError) as err:
            run_mapping(mapping, case.raw)
        expected = case.spec["error"]
        assert err.value.code == expected["code"], str(err.value)
        # the DICOM value check names the HL7 field only when the caller tells it (locations=)
        assert err.value.location in (expected["location"], "" if expected.get("at_output") else None), str(err.value)
        return
    outputs, warnings = run_mapping(mapping, case.raw)
    diffs = expect_diffs(case.items, outputs) + warning_diffs(case.warnings, warnings)
    assert not diffs, "\n".join(diffs)


# -- the running engine: MLLP in, C-FIND out ---------------------------------------------------------


async def send(app: EngineApp, raw: bytes) -> Message:
    async with MLLPClient("127.0.0.1", app.port_of(CHANNEL), read_timeout=30) as client:
        return Message.parse(await client.send(raw))


def stored_message(app: EngineApp, control_id: str) -> dict[str, Any]:
    assert app.db is not None
    with app.db.connect() as conn:
        row = conn.execute(
            select(MESSAGES).where(MESSAGES.c.control_id == control_id).order_by(MESSAGES.c.id.desc())
        ).mappings().first()
    assert row is not None, f"message {control_id} was not stored"
    return dict(row)


def worklist_rows(app: EngineApp, placer: str) -> list[dict[str, Any]]:
    assert app.db is not None
    with app.db.connect() as conn:
        return [dict(r) for r in conn.execute(select(ITEMS).where(ITEMS.c.placer_order == placer)).mappings()]


def mwl_query(expected: dict[str, Any]) -> Dataset:
    """Patient query (PatientID + RequestedProcedureID, IHE RAD-5) returning every expected key."""
    ds = Dataset()
    for keyword, value in expected.items():
        if keyword in (SPS, "SpecificCharacterSet"):
            continue
        setattr(ds, keyword, [] if isinstance(value, list) else "")
    ds.PatientID = expected["PatientID"]
    ds.RequestedProcedureID = expected["RequestedProcedureID"]
    step = Dataset()
    for keyword, value in (expected.get(SPS) or [{}])[0].items():
        setattr(step, keyword, [] if isinstance(value, list) else "")
    step.ScheduledProcedureStepStatus = ""
    ds.ScheduledProcedureStepSequence = [step]
    return ds


def _c_find(port: int, query: Dataset) -> list[Dataset]:
    ae = AE(ae_title="CORPUSSCU")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="ENGINE")
    assert assoc.is_established
    answers: list[Dataset] = []
    final = -1
    try:
        for status, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind):
            assert status is not None and "Status" in status, "no C-FIND response"
            if status.Status in (0xFF00, 0xFF01):
                assert identifier is not None
                answers.append(identifier)
            else:
                final = int(status.Status)
    finally:
        assoc.release()
    assert final == 0x0000
    return answers


def findscu_patients(port: int, sps: dict[str, Any]) -> list[str]:
    """dcmtk's findscu, the broad query a modality sends (SPS start date + modality + station AE):
    the Patient IDs of the answers, as findscu printed them."""
    keys = ["AccessionNumber", "PatientID", f"{SPS}[0].ScheduledProcedureStepID"]
    for k in ("ScheduledProcedureStepStartDate", "Modality", "ScheduledStationAETitle"):
        keys.append(f"{SPS}[0].{k}={sps[k]}" if sps.get(k) else f"{SPS}[0].{k}")
    args = [str(FINDSCU), "-v", "-W", "-aet", "CORPUSFIND", "-aec", "ENGINE"]
    for k in keys:
        args += ["-k", k]
    done = subprocess.run([*args, "127.0.0.1", str(port)], capture_output=True, timeout=60)
    log = (done.stdout + done.stderr).decode("utf-8", errors="replace")
    assert done.returncode == 0 and "Received Final Find Response (Success)" in log, log
    return [v.strip() for v in re.findall(r"\(0010,0020\) LO \[(.*?)\]", log)]


def _control_id(raw: bytes) -> str:
    return Message.parse(raw).control_id


async def _check_sent(app: EngineApp, case: Case) -> None:
    ack = await send(app, case.raw)
    assert ack.get("MSA-1") == case.ack, ack.to_er7()
    assert ack.get("MSA-2") == _control_id(case.raw)
    errors = ack.segments("ERR")
    if case.ack == "AE":
        expected = case.spec["error"]
        assert ack.get("ERR-3.1") == str(expected["code"]), ack.to_er7()
        return
    row = stored_message(app, _control_id(case.raw))
    assert row["status"] == "processed", row["error_text"] if "error_text" in row else row["status"]
    if not case.stored_warnings:
        assert not errors, ack.to_er7()
        return
    assert errors and all(ack.get(f"ERR[{i}]-4") == "W" for i in range(1, len(errors) + 1)), ack.to_er7()
    stored = json.loads(row["warnings"] or "[]")
    missing = [w for w in case.stored_warnings if not any(warning_matches(w, s) for s in stored)]
    assert not missing, f"not stored with the message: {missing}"


@pytest.mark.parametrize("case", params(end_to_end=True))
async def test_engine_answers_and_serves_the_items(running_engine: EngineApp, case: Case) -> None:
    app = running_engine
    before = case.spec.get("after")
    if before:
        await _check_sent(app, BY_NAME[before])
    await _check_sent(app, case)
    if case.ack == "AE":
        return
    status = case.spec.get("status", "SCHEDULED")
    for item in case.items:
        expected = item["dataset"]
        rows = worklist_rows(app, expected["PlacerOrderNumberImagingServiceRequest"])
        assert rows and {r["status"] for r in rows} == {status}, rows
        answers = await asyncio.to_thread(_c_find, app.scp.port, mwl_query(expected))
        if status != "SCHEDULED":
            assert answers == []  # finished steps are not served
            continue
        assert len(answers) == 1
        got = dataset_to_item(answers[0])
        wanted = {k: v for k, v in expected.items() if k != "SpecificCharacterSet"}
        diffs = expect_diffs(wanted, [got])
        assert not diffs, "\n".join(diffs)
        assert got[SPS][0]["ScheduledProcedureStepStatus"] == "SCHEDULED"
        if FINDSCU.exists():
            found = await asyncio.to_thread(findscu_patients, app.scp.port, expected[SPS][0])
            assert expected["PatientID"] in found, found
