"""The reconciliation rules of issue 14 section 2, on plain resources (no store, no HTTP)."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pytest

from engine.medrec.reconcile import Reconciliation, reconcile
from engine.medrec.rules import Rules
from engine.medrec.sources import SourceError, extract, extract_all
from tests.medrec.helpers import (
    AMLODIPINE_5,
    AMLODIPINE_10,
    ATORVA_10,
    LIPITOR_10,
    NDC,
    PATIENT,
    RXNORM,
    TODAY,
    administration,
    ago,
    bundle,
    dispense,
    med,
    request,
    statement,
)

GROUPS = {LIPITOR_10: ATORVA_10}


def run(*resources: dict[str, Any], rules: Rules | None = None, day: date = TODAY, as_of: bool = False
        ) -> Reconciliation:
    sources = [s for r in resources for _, s in extract_all(r)]
    return reconcile(PATIENT, sources, rules or Rules(groups=GROUPS), day, as_of=as_of)


def included_ids(result: Reconciliation) -> set[str]:
    return {s["id"] for r in result.records for s in r.sources}


def reason_of(result: Reconciliation, rid: str) -> str:
    return next(e.reason for e in result.excluded if e.id == rid)


@pytest.mark.parametrize(("days", "expected"), [(0, True), (99, True), (100, True), (101, False), (400, False)])
def test_dispense_window_both_ends_included(days: int, expected: bool) -> None:
    result = run(dispense("d", ago(days)))
    assert ("d" in included_ids(result)) is expected
    if not expected:
        assert "before the 100-day window" in reason_of(result, "d")


def test_window_is_configurable() -> None:
    assert "d" in included_ids(run(dispense("d", ago(150)), rules=Rules(window_days=180)))
    assert "d" not in included_ids(run(dispense("d", ago(31)), rules=Rules(window_days=30)))


def test_request_stopped_10_days_ago_is_in_with_its_status() -> None:
    result = run(request("r", "stopped", ago(10)))
    assert len(result.records) == 1
    assert result.records[0].status == "stopped"
    assert result.records[0].date == TODAY - timedelta(days=10)


def test_active_request_authored_400_days_ago_is_in() -> None:
    result = run(request("r", "active", ago(400)), request("h", "on-hold", ago(900), code=AMLODIPINE_5))
    assert included_ids(result) == {"r", "h"}
    assert "whatever its date" in result.records[0].sources[0]["reason"]


def test_completed_request_outside_the_window_is_out() -> None:
    result = run(request("r", "completed", ago(101)))
    assert not result.records and "authoredOn" in reason_of(result, "r")


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled", "draft"])
def test_never_included_request_statuses(status: str) -> None:
    result = run(request("r", status, ago(1)))
    assert not result.records
    assert reason_of(result, "r") == f"status {status} is never included"


def test_never_included_other_statuses() -> None:
    result = run(
        dispense("d1", ago(1), status="declined"),
        dispense("d2", ago(1), status="entered-in-error"),
        administration("a", ago(1), status="not-done"),
        statement("s1", "not-taken", effectiveDateTime=ago(1)),
        statement("s2", "active", taken="n"),
    )
    assert not result.records
    assert {e.id for e in result.excluded} == {"d1", "d2", "a", "s1", "s2"}
    assert reason_of(result, "s2") == "taken = n"


def test_statement_open_period_begun_700_days_ago_is_in() -> None:
    result = run(statement("s", "completed", effectivePeriod={"start": ago(700)}))
    assert included_ids(result) == {"s"}
    assert "open effectivePeriod" in result.records[0].sources[0]["reason"]


def test_statement_ended_150_days_ago_is_out() -> None:
    result = run(statement("s", "completed", effectivePeriod={"start": ago(400), "end": ago(150)}))
    assert not result.records and "ended" in reason_of(result, "s")


def test_statement_active_or_intended_is_in_whatever_its_date() -> None:
    result = run(statement("s1", "active", effectiveDateTime=ago(1000)),
                 statement("s2", "intended", code=AMLODIPINE_5))
    assert included_ids(result) == {"s1", "s2"}


def test_administration_period_overlapping_the_window_is_in() -> None:
    admin = administration("a", ago(1))
    del admin["effectiveDateTime"]
    admin["effectivePeriod"] = {"start": ago(130), "end": ago(95)}
    assert included_ids(run(admin)) == {"a"}
    admin["effectivePeriod"] = {"start": ago(130), "end": ago(101)}
    assert not run(admin).records


def test_fallback_dates_only_when_configured() -> None:
    prepared = dispense("d", None, whenPrepared=ago(5))
    asserted = statement("s", "completed", dateAsserted=ago(5), code=AMLODIPINE_5)
    off = run(prepared, asserted)
    assert not off.records
    assert reason_of(off, "d") == "no whenHandedOver"
    on = run(prepared, asserted, rules=Rules(fallbacks=frozenset({"whenPrepared", "dateAsserted"})))
    assert included_ids(on) == {"d", "s"}


def test_request_and_dispense_same_rxnorm_make_one_record_dated_at_the_dispense() -> None:
    result = run(request("r", "completed", ago(30)), dispense("d", ago(20)))
    assert len(result.records) == 1
    record = result.records[0]
    assert record.date == TODAY - timedelta(days=20)
    assert record.winner == "MedicationDispense/d"
    assert [(s["type"], s["id"]) for s in record.sources] == [("MedicationDispense", "d"), ("MedicationRequest", "r")]
    assert record.sources[1]["status"] == "completed"


def test_four_types_on_one_date_the_hierarchy_decides() -> None:
    day = ago(5)
    resources = [
        request("r", "active", day),
        statement("s", "active", effectiveDateTime=day),
        administration("a", day + "T08:00:00Z"),
        dispense("d", day + "T07:00:00Z", status="completed"),
    ]
    result = run(*resources)
    assert len(result.records) == 1
    assert result.records[0].winner == "MedicationDispense/d"
    assert len(result.records[0].sources) == 4
    order = ("MedicationStatement", "MedicationRequest", "MedicationAdministration", "MedicationDispense")
    flipped = run(*resources, rules=Rules(hierarchy=order))
    assert flipped.records[0].winner == "MedicationStatement/s"
    assert flipped.records[0].status == "active"


def test_two_strengths_are_two_records() -> None:
    result = run(dispense("d5", ago(3), code=AMLODIPINE_5), dispense("d10", ago(3), code=AMLODIPINE_10))
    assert len(result.records) == 2


def test_brand_and_generic_grouped_only_via_the_table() -> None:
    resources = (dispense("brand", ago(3), code=LIPITOR_10), request("generic", "active", ago(40), code=ATORVA_10))
    assert len(run(*resources, rules=Rules()).records) == 2
    grouped = run(*resources, rules=Rules(groups=GROUPS))
    assert len(grouped.records) == 1
    assert grouped.records[0].key == f"{RXNORM}|{ATORVA_10}"


def test_ndc_then_rxnorm_order() -> None:
    a = dispense("a", ago(3), code=None, **med("0071-0155-23", NDC))
    b = request("b", "active", ago(3), code=None, **med("0071-0155-23", NDC))
    assert len(run(a, b).records) == 1
    # both carry RxNorm and it differs: the same NDC does not merge them
    a["medicationCodeableConcept"]["coding"].append({"system": RXNORM, "code": ATORVA_10})
    b["medicationCodeableConcept"]["coding"].append({"system": RXNORM, "code": AMLODIPINE_5})
    assert len(run(a, b).records) == 2


def test_text_only_never_merged_with_coded() -> None:
    coded = dispense("coded", ago(3), code=None, **med(ATORVA_10, text="atorvastatin 10 mg"))
    text_only = request("text", "active", ago(3), code=None, **med(None, text="atorvastatin 10 mg"))
    text_two = statement("text2", "active", code=None, **med(None, text="Atorvastatin  10 MG"))
    result = run(coded, text_only, text_two)
    assert len(result.records) == 3
    merged = run(coded, text_only, text_two, rules=Rules(text_merge=True))
    assert len(merged.records) == 2  # the two text-only ones merge; never with the coded one
    assert sorted(len(r.sources) for r in merged.records) == [1, 2]


def test_no_code_no_reference_is_an_unmatched_record_never_merged() -> None:
    a = request("a", "active", ago(3), code=None)
    b = request("b", "active", ago(3), code=None)
    result = run(a, b)
    assert len(result.records) == 2
    assert all(r.unmatched for r in result.records)
    assert {r.key for r in result.records} == {"unmatched:MedicationRequest/a", "unmatched:MedicationRequest/b"}


def test_contained_medication_is_resolved() -> None:
    res = request("r", "active", ago(3), code=None, medicationReference={"reference": "#m"},
                  contained=[{"resourceType": "Medication", "id": "m", "code": med(ATORVA_10)[
                      "medicationCodeableConcept"]}])
    result = run(res, dispense("d", ago(2)))
    assert len(result.records) == 1 and len(result.records[0].sources) == 2


def test_bundled_medication_is_resolved() -> None:
    medication = {"resourceType": "Medication", "id": "m1", "code": med(LIPITOR_10)["medicationCodeableConcept"]}
    by_id = request("r1", "active", ago(3), code=None, medicationReference={"reference": "Medication/m1"})
    by_url = dispense("d1", ago(2), code=None, medicationReference={"reference": "urn:uuid:4b8f"})
    b = bundle(medication, by_id, by_url)
    b["entry"][0]["fullUrl"] = "urn:uuid:4b8f"
    result = run(b, dispense("d2", ago(1)))
    assert len(result.records) == 1
    assert {s["id"] for s in result.records[0].sources} == {"r1", "d1", "d2"}


def test_unresolved_reference_merges_only_with_the_same_reference() -> None:
    a = request("a", "active", ago(3), code=None, medicationReference={"reference": "Medication/x"})
    b = dispense("b", ago(2), code=None, medicationReference={"reference": "Medication/x"})
    c = dispense("c", ago(2))
    result = run(a, b, c)
    assert sorted(len(r.sources) for r in result.records) == [1, 2]
    assert not any(r.unmatched for r in result.records)


def test_a_date_near_midnight_with_an_offset_counts_in_the_zone() -> None:
    # 23:30 in New York on day -101 is 03:30 UTC on day -100
    late = f"{ago(101)}T23:30:00-04:00"
    assert "d" not in included_ids(run(dispense("d", late), rules=Rules(timezone="America/New_York")))
    assert "d" in included_ids(run(dispense("d", late), rules=Rules(timezone="UTC")))
    # 00:30 +02:00 on day -100 is 22:30 UTC on day -101
    early = f"{ago(100)}T00:30:00+02:00"
    assert "d" not in included_ids(run(dispense("d", early), rules=Rules(timezone="UTC")))
    assert "d" in included_ids(run(dispense("d", early), rules=Rules(timezone="Africa/Johannesburg")))


def test_as_of_shows_the_list_of_another_day() -> None:
    resources = (dispense("old", ago(150)), dispense("new", ago(5), code=AMLODIPINE_5))
    now = run(*resources)
    assert included_ids(now) == {"new"}
    then = run(*resources, day=TODAY - timedelta(days=100), as_of=True)
    assert included_ids(then) == {"old"}
    assert "dated after" in reason_of(then, "new")


def test_patient_keys_and_unknown_patients() -> None:
    res = request("r", "active", ago(1))
    res["subject"] = {"reference": "https://emr.example/fhir/Patient/p1/_history/3"}
    assert extract(res).patient == PATIENT
    res["subject"] = {"reference": "urn:uuid:1234"}
    assert extract(res).patient == "urn:uuid:1234"
    res["subject"] = {"identifier": {"system": "urn:mrn", "value": "42"}}
    assert extract(res).patient == "identifier:urn:mrn|42"


def test_malformed_date_and_missing_subject_name_the_element() -> None:
    with pytest.raises(SourceError) as bad_date:
        list(extract_all(bundle(dispense("d", "2026-13-45"))))
    assert bad_date.value.location == "Bundle.entry[0].resource.whenHandedOver"
    res = request("r", "active", ago(1))
    del res["subject"]
    with pytest.raises(SourceError) as no_subject:
        extract(res)
    assert no_subject.value.location == "MedicationRequest.subject"


def test_every_record_shape_makes_a_valid_list() -> None:
    from engine.medrec.fhir_list import build_list

    result = run(
        request("coded", "stopped", ago(3)),
        request("text", "active", ago(3), code=None, **med(None, text="home remedy")),
        request("ref", "active", ago(3), code=None, medicationReference={"reference": "Medication/x"}),
        request("none", "active", code=None),
        dispense("d", ago(2), code=AMLODIPINE_5, status="in-progress", dosageInstruction=[{"text": "1 daily"}]),
    )
    lst = build_list(result)  # validates with fhir.resources (R4B), raises when invalid
    shapes = {s["derivedFrom"][0]["reference"]: s for s in lst["contained"]}
    assert shapes["MedicationRequest/ref"]["medicationReference"] == {"reference": "Medication/x"}
    assert shapes["MedicationRequest/text"]["medicationCodeableConcept"] == {"text": "home remedy"}
    assert "effectiveDateTime" not in shapes["MedicationRequest/none"]
    assert shapes["MedicationDispense/d"]["status"] == "unknown"  # not a MedicationStatement status
    assert shapes["MedicationDispense/d"]["dosage"] == [{"text": "1 daily"}]
    assert shapes["MedicationRequest/coded"]["status"] == "stopped"


@pytest.mark.parametrize("text", ["2026-13-01", "2026-02-30", "2026-+1-01", "26-01-01", "2026-01-01T25:00:00Z",
                                  "yesterday", "2026-01-01 10:00:00"])
def test_malformed_dates_are_refused(text: str) -> None:
    from engine.medrec.dates import BadDate, parse_fhir_date
    from engine.medrec.rules import Rules

    with pytest.raises(BadDate):
        parse_fhir_date(text, Rules().tz)


def test_date_forms() -> None:
    from zoneinfo import ZoneInfo

    from engine.medrec.dates import parse_fhir_date

    ny = ZoneInfo("America/New_York")
    assert parse_fhir_date("2026-06-15", ny).day == date(2026, 6, 15)
    assert parse_fhir_date("2026-06", ny).day == date(2026, 6, 1)
    assert parse_fhir_date("2026", ny).day == date(2026, 1, 1)
    assert parse_fhir_date("2026-06-15T02:00:00Z", ny).day == date(2026, 6, 14)
    assert parse_fhir_date("2026-06-15T02:00:00.123+00:00", ny).day == date(2026, 6, 14)
    assert parse_fhir_date("2026-06-15T02:00:00", ny).day == date(2026, 6, 15)  # no offset: local time
