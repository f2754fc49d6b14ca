"""The medrec destination on a real store (SQLite and PostgreSQL): sources are stored once per
resource, records are recomputed in the unit's transaction, status changes and as-of work."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import func, select

from engine.errors import ProcessingError
from engine.medrec.fhir_list import build_list
from engine.runtime.destinations.base import MessageContext
from engine.runtime.destinations.medrec import MedrecDestination, MedrecDestinationConfig, patient_param
from engine.store import crypto
from engine.store.db import init_db, make_engine
from engine.store.medrec import MedrecRecord, MedrecSource, MedrecSourceVersion
from tests.medrec.helpers import AMLODIPINE_5, ATORVA_10, LIPITOR_10, PATIENT, bundle, dispense, request

ROOT = Path(__file__).resolve().parents[2]
CHANNEL = "emr-medications"


@dataclass
class View:
    resource: dict[str, Any]


def today_ago(days: int) -> str:
    return (datetime.now(UTC).date() - timedelta(days=days)).isoformat()


@pytest.fixture
def dest() -> MedrecDestination:
    config = MedrecDestinationConfig(name="records", type="medrec")
    return MedrecDestination(config, base_dir=ROOT)


@pytest.fixture
def db(db_url: str) -> Any:
    crypto.configure(crypto.Keyring(None))
    engine = make_engine(db_url)
    init_db(engine)
    yield engine
    engine.dispose()


def post(db: Any, dest: MedrecDestination, resource: dict[str, Any], received: datetime | None = None) -> None:
    ctx = MessageContext(CHANNEL, b"", View(resource), resource["resourceType"], "c1", "", received or
                         datetime.now(UTC), message_id=None)
    with db.begin() as conn:
        dest.apply(conn, ctx, [])


def the_list(db: Any, dest: MedrecDestination, as_of: date | None = None, explain: bool = False) -> Any:
    with db.connect() as conn:
        return dest.reconciliation(conn, CHANNEL, PATIENT, as_of, explain=explain)


def count(db: Any, table: Any) -> int:
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_bundle_is_reconciled_in_the_transaction_and_resends_write_nothing(db: Any, dest: MedrecDestination) -> None:
    b = bundle(request("r1", "completed", today_ago(30)), dispense("d1", today_ago(20)),
               dispense("d2", today_ago(3), code=LIPITOR_10),
               request("r2", "active", today_ago(400), code=AMLODIPINE_5),
               dispense("old", today_ago(101), code=AMLODIPINE_5))
    post(db, dest, b)
    result = the_list(db, dest)
    assert len(result.records) == 2
    atorva = next(r for r in result.records if ATORVA_10 in r.key)
    assert {s["id"] for s in atorva.sources} == {"r1", "d1", "d2"}  # brand grouped via the shipped table
    assert count(db, MedrecSource) == 5 and count(db, MedrecSourceVersion) == 5 and count(db, MedrecRecord) == 2
    post(db, dest, b)  # the same Bundle again: no new version
    assert count(db, MedrecSource) == 5 and count(db, MedrecSourceVersion) == 5
    explained = the_list(db, dest, explain=True)
    assert [e.id for e in explained.excluded] == ["old"]


def test_a_request_that_changes_status_recomputes_its_record(db: Any, dest: MedrecDestination) -> None:
    post(db, dest, request("r", "active", today_ago(300)))
    assert [r.status for r in the_list(db, dest).records] == ["active"]
    post(db, dest, request("r", "stopped", today_ago(300)))
    result = the_list(db, dest)
    assert result.records == []
    assert count(db, MedrecSource) == 1 and count(db, MedrecSourceVersion) == 2
    post(db, dest, request("r", "stopped", today_ago(5)))
    assert [r.status for r in the_list(db, dest).records] == ["stopped"]


def test_as_of_uses_the_versions_known_that_day(db: Any, dest: MedrecDestination) -> None:
    now = datetime.now(UTC)
    post(db, dest, request("r", "active", today_ago(300)), received=now - timedelta(days=10))
    post(db, dest, request("r", "stopped", today_ago(300)), received=now)
    assert the_list(db, dest).records == []
    then = the_list(db, dest, as_of=(now - timedelta(days=5)).date())
    assert [r.status for r in then.records] == ["active"]
    before = the_list(db, dest, as_of=(now - timedelta(days=20)).date())
    assert before.records == []


def test_a_resource_moved_to_another_patient_leaves_the_first_list(db: Any, dest: MedrecDestination) -> None:
    post(db, dest, dispense("d", today_ago(3)))
    moved = dispense("d", today_ago(3))
    moved["subject"] = {"reference": "Patient/p2"}
    post(db, dest, moved)
    assert the_list(db, dest).records == []
    with db.connect() as conn:
        other = dest.reconciliation(conn, CHANNEL, "Patient/p2")
    assert len(other.records) == 1
    assert count(db, MedrecSource) == 1


def test_a_bad_resource_refuses_the_unit_naming_the_element(db: Any, dest: MedrecDestination) -> None:
    with pytest.raises(ProcessingError) as exc:
        post(db, dest, bundle(dispense("ok", today_ago(1)), dispense("bad", "2026-02-30")))
    assert exc.value.location == "Bundle.entry[1].resource.whenHandedOver"
    assert count(db, MedrecSource) == 0  # rolled back with the unit


def test_sources_are_unique_per_resource_in_the_database(db: Any) -> None:
    row = {"channel": CHANNEL, "patient_key": PATIENT, "resource_type": "MedicationRequest", "resource_id": "r",
           "status": "active", "updated_at": "", "data": "{}"}
    with db.begin() as conn:
        conn.execute(MedrecSource.__table__.insert(), row)  # type: ignore[attr-defined]
    with pytest.raises(sqlalchemy.exc.IntegrityError), db.begin() as conn:
        conn.execute(MedrecSource.__table__.insert(), row)  # type: ignore[attr-defined]


def test_list_resource_validates_and_says_when_empty(db: Any, dest: MedrecDestination) -> None:
    empty = build_list(the_list(db, dest))
    assert empty["emptyReason"]["coding"][0]["code"] == "nilknown" and "entry" not in empty
    post(db, dest, bundle(request("r1", "completed", today_ago(30)), dispense("d1", today_ago(20))))
    lst = build_list(the_list(db, dest))
    assert lst["code"]["coding"][0]["code"] == "10160-0"
    assert (lst["mode"], lst["status"], lst["subject"]) == ("working", "current", {"reference": PATIENT})
    (statement,) = lst["contained"]
    assert [d["reference"] for d in statement["derivedFrom"]] == ["MedicationDispense/d1", "MedicationRequest/r1"]
    assert lst["entry"] == [{"item": {"reference": f"#{statement['id']}"}}]


def test_sealed_at_rest(db: Any, dest: MedrecDestination) -> None:
    crypto.configure(crypto.Keyring(b"K" * 32))
    try:
        post(db, dest, dispense("d", today_ago(3)))
        with db.connect() as conn:
            values = [v for t in ("medrec_sources", "medrec_source_versions", "medrec_records")
                      for (v,) in conn.exec_driver_sql(f"SELECT data FROM {t}")]
        assert values and all(v.startswith("ek1:") for v in values)
        assert len(the_list(db, dest).records) == 1
    finally:
        crypto.configure(crypto.Keyring(None))


def test_patient_param_spellings() -> None:
    assert patient_param("p1") == patient_param("Patient/p1") == patient_param("https://x/fhir/Patient/p1") == PATIENT


def test_an_older_version_arriving_late_does_not_replace_the_stored_one(db: Any, dest: MedrecDestination) -> None:
    first = request("r", "stopped", today_ago(300), meta={"lastUpdated": "2026-11-20T10:00:00+01:00"})  # 09:00Z
    second = request("r", "active", today_ago(300), meta={"lastUpdated": "2026-11-20T09:30:00Z"})
    post(db, dest, first)
    post(db, dest, second)  # compared in UTC: 09:30Z is the later change, so it replaces the first
    assert [r.status for r in the_list(db, dest).records] == ["active"]
    post(db, dest, request("r", "stopped", today_ago(300), meta={"lastUpdated": "2026-11-19T00:00:00Z"}))
    assert [r.status for r in the_list(db, dest).records] == ["active"]  # a day older: ignored
    assert count(db, MedrecSourceVersion) == 2


def test_a_second_channel_can_feed_the_same_lists(db: Any, dest: MedrecDestination) -> None:
    poll = MedrecDestination(MedrecDestinationConfig(name="records", type="medrec", list_name=CHANNEL), base_dir=ROOT)
    post(db, dest, request("r1", "completed", today_ago(30)))
    ctx = MessageContext("emr-medications-poll", b"", View(dispense("d1", today_ago(20))), "MedicationDispense", "c2",
                         "", datetime.now(UTC))
    with db.begin() as conn:
        poll.apply(conn, ctx, [])
    (record,) = the_list(db, dest).records
    assert [s["id"] for s in record.sources] == ["d1", "r1"]
    with db.connect() as conn:
        assert poll.reconciliation(conn, "emr-medications-poll", PATIENT).records == [record]


def test_two_writers_on_one_patient_take_turns(db: Any, dest: MedrecDestination, db_url: str) -> None:
    """Two engine processes on one PostgreSQL store: a unit for a patient waits for the other's commit
    (SQLite has one writer, so the second simply queues on the write lock)."""
    import threading

    first = db.connect()
    tx = first.begin()
    ctx = MessageContext(CHANNEL, b"", View(request("r1", "completed", today_ago(30))), "MedicationRequest", "c1", "",
                         datetime.now(UTC))
    dest.apply(first, ctx, [])
    done = threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            post(db, dest, dispense("d1", today_ago(20)))
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            done.set()

    other = threading.Thread(target=second)
    other.start()
    assert not done.wait(1.0)  # it waits for the first transaction
    tx.commit()
    first.close()
    assert done.wait(60)
    other.join(60)
    assert errors == []
    (record,) = the_list(db, dest).records
    assert [s["id"] for s in record.sources] == ["d1", "r1"]
