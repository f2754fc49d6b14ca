"""PHI at rest: sealed bodies, datasets and payloads (ENGINE_KEY), key rotation, file modes.

End to end over MLLP and C-FIND with the shipped configuration, on SQLite (the database file's
bytes are searched for the patient's name) and PostgreSQL (the columns' bytes are).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]
from sqlalchemy import Engine, select
from sqlalchemy.engine import Connection

from engine.hl7.er7 import Message
from engine.hl7.mllp import MLLPClient
from engine.runtime.app import EngineApp, default_registry
from engine.runtime.config import load_config
from engine.store import crypto, rekey
from engine.store.db import init_db, make_engine
from engine.store.messages import get_message
from engine.store.models import Delivery
from engine.store.models import Message as StoredMessage
from engine.store.queue import deliveries_for
from engine.store.worklist import WorklistItem, find_item, insert_item
from engine.store.writer import QueuedPayload, WorkUnit, Writer

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = (ROOT / "samples" / "hl7" / "orm_o01_ct.hl7").read_bytes()
NAME = b"Doe^Jane"  # PID-5 of the sample
MESSAGES = StoredMessage.__table__  # type: ignore[attr-defined]
DELIVERIES = Delivery.__table__  # type: ignore[attr-defined]
ITEMS = WorklistItem.__table__  # type: ignore[attr-defined]

KEY_A = base64.b64encode(b"A" * 32).decode()
KEY_B = base64.b64encode(b"B" * 32).decode()


@pytest.fixture(autouse=True)
def no_keyring_left_behind() -> Iterator[None]:
    """Each test sets its own keyring; the next one reads the environment again."""
    crypto.configure(None)
    yield
    crypto.configure(None)


def ring(current: str | None, *old: str) -> crypto.Keyring:
    return crypto.Keyring.from_settings(current or "", ",".join(old))


def order(n: int) -> bytes:
    """The sample ORM with its own control id, order numbers and accession."""
    text = SAMPLE.replace(b"|ORM0001|", f"|REST{n:04d}|".encode())
    for old in (b"PL1001", b"FL1001", b"ACC1001", b"SPS1001", b"RP1001"):
        text = text.replace(old, old[:-4] + f"{9000 + n}".encode())
    return text.replace(b"1.2.826.0.1.3680043.8.498.1001", f"1.2.826.0.1.3680043.8.498.{9000 + n}".encode())


# -- the keyring ------------------------------------------------------------------------------------


def test_seal_and_open_round_trip_with_key_ids_and_column_binding() -> None:
    r = ring(KEY_A)
    body = b"MSH|^~\\&|RIS\rPID|1||100234||Doe^Jane\r"
    sealed = r.seal(body, crypto.RAW)
    assert NAME not in sealed and sealed[:4] == crypto.MAGIC
    assert crypto.stored_key_id(sealed) == r.current_id() == crypto.key_id(b"A" * 32).hex()
    assert r.open(sealed, crypto.RAW) == body
    with pytest.raises(crypto.UnreadableValue, match="does not open"):
        r.open(sealed, crypto.PAYLOAD)  # a value copied into another column does not open
    text = r.seal_text('{"PatientName":"Doe^Jane"}', crypto.DATASET)
    assert "Doe" not in text and text.startswith(f"ek1:{r.current_id()}:")
    assert r.open_text(text, crypto.DATASET) == '{"PatientName":"Doe^Jane"}'
    with pytest.raises(crypto.UnreadableValue, match=r.current_id()):
        ring(KEY_B).open(sealed, crypto.RAW)  # names the key id it needs, never a key


def test_without_a_key_values_stay_clear_and_a_magic_lookalike_is_wrapped() -> None:
    r = ring(None)
    assert r.seal(b"MSH|x", crypto.RAW) == b"MSH|x"
    lookalike = crypto.MAGIC + b"\x01\x02\x03\x04 not sealed"
    stored = r.seal(lookalike, crypto.RAW)
    assert stored != lookalike and crypto.stored_key_id(stored) == "clear"
    assert r.open(stored, crypto.RAW) == lookalike
    assert ring(KEY_A).open(stored, crypto.RAW) == lookalike
    assert r.open_text(r.seal_text("ek1:abc", crypto.DATASET), crypto.DATASET) == "ek1:abc"


@pytest.mark.parametrize("value", ["not base64!", base64.b64encode(b"short").decode(), "c2VjcmV0" * 3])
def test_a_bad_key_names_the_setting_not_the_value(value: str) -> None:
    with pytest.raises(crypto.KeyConfigError) as caught:
        crypto.Keyring.from_settings(value)
    assert "ENGINE_KEY" in str(caught.value) and value not in str(caught.value)
    with pytest.raises(crypto.KeyConfigError, match="ENGINE_KEY_OLD"):
        crypto.Keyring.from_settings(KEY_A, value)


def test_key_from_env_reads_engine_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_KEY", KEY_A)
    monkeypatch.setenv("ENGINE_KEY_OLD", KEY_B)
    r = crypto.key_from_env()
    assert r.current_id() == crypto.key_id(b"A" * 32).hex() and len(r.keys) == 2
    monkeypatch.setenv("ENGINE_KEY", "x")
    with pytest.raises(crypto.KeyConfigError, match="ENGINE_KEY is not valid"):
        crypto.key_from_env()


def test_start_says_once_when_phi_is_stored_unencrypted(caplog: pytest.LogCaptureFixture) -> None:
    crypto.configure(ring(None))
    with caplog.at_level(logging.INFO, logger="engine.store.crypto"):
        crypto.announce()
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "stored unencrypted" in caplog.text
    caplog.clear()
    crypto.configure(ring(KEY_A))
    with caplog.at_level(logging.INFO, logger="engine.store.crypto"):
        crypto.announce()
    assert "encrypted (AES-GCM, key id" in caplog.text and KEY_A not in caplog.text


# -- the store --------------------------------------------------------------------------------------


def _store(db: Engine, n: int) -> int:
    writer = Writer(db)

    def effects(conn: Connection, mid: int) -> list[QueuedPayload]:
        insert_item(conn, {"PatientName": "Doe^Jane", "PatientID": "100234", "AccessionNumber": f"A{n}",
                           "FillerOrderNumberImagingServiceRequest": f"F{n}"}, channel="t")
        return [QueuedPayload("archive", order(n), ordering_key=f"k{n}")]

    result = writer.submit_sync(WorkUnit("t", order(n), datetime.now(UTC), control_id=f"REST{n:04d}", effects=effects))
    return result.message_id


def _all_values(db: Engine) -> list[bytes]:
    with db.connect() as conn:
        raws = [bytes(r[0]) for r in conn.execute(select(MESSAGES.c.raw))]
        payloads = [bytes(r[0]) for r in conn.execute(select(DELIVERIES.c.payload))]
        datasets = [r[0].encode() for r in conn.execute(select(ITEMS.c.dataset_json))]
    return raws + payloads + datasets


def test_sealed_columns_read_back_everywhere_and_hold_no_name(db_url: str) -> None:
    crypto.configure(ring(KEY_A))
    db = make_engine(db_url)
    init_db(db)
    try:
        mid = _store(db, 1)
        values = _all_values(db)
        assert len(values) == 3 and not any(NAME in v or b"100234" in v for v in values)
        assert {crypto.stored_key_id(v.decode() if v.startswith(b"ek1:") else v) for v in values} == {
            crypto.key_id(b"A" * 32).hex()}
        row = get_message(db, mid)
        assert row is not None and row["raw"] == order(1)
        assert [d["payload"] for d in deliveries_for(db, mid)] == [order(1)]
        with db.connect() as conn:
            item = find_item(conn, filler_order="F1")
        assert item is not None and item["dataset"]["PatientName"] == "Doe^Jane"
        with db.connect() as conn:  # indexed columns stay clear text: filters and C-FIND narrowing use them
            assert conn.execute(select(ITEMS.c.patient_id, ITEMS.c.accession_number)).one() == ("100234", "A1")
    finally:
        db.dispose()


def test_rotation_reseals_every_row_and_everything_stays_readable(db_url: str) -> None:
    crypto.configure(ring(KEY_A))
    db = make_engine(db_url)
    init_db(db)
    try:
        ids = [_store(db, n) for n in range(1, 6)]
        crypto.configure(ring(None))
        clear = _store(db, 6)  # stored before encryption was turned on: rotate seals it too
        new = ring(KEY_B, KEY_A)
        crypto.configure(new)
        counts = rekey.key_counts(db)
        a_id, b_id = crypto.key_id(b"A" * 32).hex(), crypto.key_id(b"B" * 32).hex()
        assert counts["messages.raw"] == {a_id: 5, "clear": 1}
        done = rekey.rotate(db, new, batch=2)
        medrec = dict.fromkeys(("medrec_sources.data", "medrec_source_versions.data", "medrec_records.data"), 0)
        assert done == {"messages.raw": 6, "deliveries.payload": 6, "worklist_items.dataset_json": 6,
                        "performed_steps.dataset_json": 0, **medrec}  # no MPPS or medication stored here
        assert all(c == {b_id: 6} for c in rekey.key_counts(db).values() if c)
        assert rekey.rotate(db, new) == dict.fromkeys(done, 0)  # nothing left to do
        crypto.configure(ring(KEY_B))  # the old key is no longer needed
        for n, mid in enumerate([*ids, clear], start=1):
            row = get_message(db, mid)
            assert row is not None and row["raw"] == order(n)
            assert [d["payload"] for d in deliveries_for(db, mid)] == [order(n)]
        assert not any(NAME in v for v in _all_values(db))
    finally:
        db.dispose()


def test_a_wrong_key_is_refused_at_start_by_key_id(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'engine.db'}"
    crypto.configure(ring(KEY_A))
    db = make_engine(url)
    init_db(db)
    _store(db, 1)
    crypto.configure(ring(KEY_B))
    with pytest.raises(crypto.KeyConfigError) as caught:
        init_db(db)
    text = str(caught.value)
    assert crypto.key_id(b"A" * 32).hex() in text and "ENGINE_KEY" in text
    assert KEY_A not in text and KEY_B not in text
    crypto.configure(ring(None))  # no key at all is refused the same way
    with pytest.raises(crypto.KeyConfigError, match="configured: none"):
        init_db(db)
    db.dispose()


def test_keyring_file_is_reloaded_when_it_names_a_new_key(tmp_path: Path) -> None:
    path = tmp_path / "keyring"
    path.write_text(f"# engine keys\n{KEY_A}\n")
    path.chmod(0o600)
    r = crypto.Keyring.from_file(path)
    sealed_a = r.seal(b"x", crypto.RAW)
    other = crypto.Keyring.from_file(path)
    path.write_text(f"{KEY_B}\n{KEY_A}\n")
    os.utime(path, (1, 1))  # a new mtime whatever the clock's resolution
    sealed_b = crypto.Keyring.from_file(path).seal(b"y", crypto.RAW)
    assert other.open(sealed_b, crypto.RAW) == b"y"  # an unknown key id makes it read the file again
    other.refresh(force=True)
    assert other.current_id() == crypto.key_id(b"B" * 32).hex() and other.open(sealed_a, crypto.RAW) == b"x"
    path.chmod(0o644)
    with pytest.raises(crypto.KeyConfigError, match="readable by other users"):
        crypto.Keyring.from_file(path)


# -- file modes -------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_store_files_are_0600_in_a_0700_folder_whatever_the_umask(tmp_path: Path) -> None:
    store = tmp_path / "data" / "store" / "engine.db"
    old = os.umask(0)  # the most permissive umask: modes must not depend on it
    try:
        db = make_engine(f"sqlite:///{store}")
        init_db(db)
        _store(db, 1)
    finally:
        os.umask(old)
    try:
        assert _mode(store.parent) == 0o700 and _mode(store.parent.parent) == 0o700
        for name in ("engine.db", "engine.db-wal", "engine.db-shm"):
            assert (store.parent / name).exists(), name
            assert _mode(store.parent / name) == 0o600, name
    finally:
        db.dispose()


# -- end to end: MLLP in, C-FIND out, with a key --------------------------------------------------


def _c_find(port: int, accession: str) -> list[Dataset]:
    ae = AE(ae_title="RESTSCU")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="ENGINE")
    assert assoc.is_established
    query = Dataset()
    query.PatientName = ""
    query.PatientID = ""
    query.AccessionNumber = accession
    step = Dataset()
    step.Modality = ""
    step.ScheduledProcedureStepStartDate = ""
    query.ScheduledProcedureStepSequence = [step]
    answers = []
    try:
        for status, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind):
            assert status is not None and "Status" in status
            if status.Status in (0xFF00, 0xFF01):
                answers.append(identifier)
            else:
                assert status.Status == 0x0000
    finally:
        assoc.release()
    return answers


async def _start(tmp_path: Path, url: str) -> EngineApp:
    registry = default_registry()
    env = {
        "ENGINE_STORAGE_URL": url,
        "ORDERS_MLLP_PORT": "0",
        "RESULTS_MLLP_PORT": "0",
        "DICOM_PORT": "0",
        "HTTP_PORT": "0",
        "ORDERS_ARCHIVE_DIR": str(tmp_path / "archive" / "orders"),
        "RESULTS_OUTBOX_DIR": str(tmp_path / "outbox"),
        "ENGINE_LOG_LEVEL": "WARNING",
    }
    app = EngineApp(load_config(ROOT / "engine.yaml", registry, env=env), registry)
    await app.start()
    return app


async def _send(app: EngineApp, body: bytes) -> Message:
    async with MLLPClient("127.0.0.1", app.port_of("ris-orders"), read_timeout=30) as client:
        return Message.parse(await client.send(body))


async def _archived(folder: Path, count: int) -> list[Path]:
    """The file destination's files once the delivery worker wrote them (polling, no time asserted)."""
    for _ in range(600):
        found = sorted(p for p in folder.glob("*") if not p.name.endswith(".part")) if folder.exists() else []
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} archive files were not written")


async def test_mllp_to_cfind_with_a_key_and_live_rotation(db_url: str, tmp_path: Path) -> None:
    keyring = tmp_path / "keyring"
    keyring.write_text(f"{KEY_A}\n")
    keyring.chmod(0o600)
    crypto.configure(crypto.Keyring.from_file(keyring))  # what ENGINE_KEYRING=<file> gives the engine
    app = await _start(tmp_path, db_url)
    try:
        assert app.db is not None and app.scp is not None
        for n in (1, 2):
            assert (await _send(app, order(n))).get("MSA-1") == "AA"
        answers = await asyncio.to_thread(_c_find, app.scp.port, "ACC9001")
        assert [str(a.PatientName) for a in answers] == ["Doe^Jane^Anne^Mrs"]
        assert not any(NAME in v for v in _all_values(app.db))
        if db_url.startswith("sqlite"):  # the file and its WAL, byte for byte
            store = tmp_path / "engine.db"
            for path in (store, store.with_name("engine.db-wal")):
                assert path.exists() and NAME not in path.read_bytes() and b"19800512" not in path.read_bytes()
                assert _mode(path) == 0o600
        archive = tmp_path / "archive" / "orders"
        files = await _archived(archive, 2)
        assert _mode(archive) == 0o700 and _mode(archive.parent) == 0o700
        assert all(_mode(p) == 0o600 for p in files)
        assert {p.read_bytes() for p in files} == {order(1), order(2)}  # delivered opened, as received

        # rotation beside the running engine: the new key first in the file, the old one kept
        keyring.write_text(f"{KEY_B}\n{KEY_A}\n")
        os.utime(keyring, (1, 1))
        rotator = crypto.Keyring.from_file(keyring)  # what `engine keys rotate` reads
        sent = asyncio.create_task(_send(app, order(3)))
        await asyncio.to_thread(rekey.rotate, app.db, rotator, batch=1)
        assert (await sent).get("MSA-1") == "AA"
        answers = await asyncio.to_thread(_c_find, app.scp.port, "ACC9002")  # readable while rotating
        assert [str(a.PatientName) for a in answers] == ["Doe^Jane^Anne^Mrs"]
        crypto.keyring().refresh(force=True)  # the engine reads the file within a second; no waiting here
        assert (await _send(app, order(4))).get("MSA-1") == "AA"
        await asyncio.to_thread(rekey.rotate, app.db, rotator)  # what the engine wrote meanwhile with key A
        b_id = crypto.key_id(b"B" * 32).hex()
        counts = await asyncio.to_thread(rekey.key_counts, app.db)
        assert counts["messages.raw"] == {b_id: 4} and counts["worklist_items.dataset_json"] == {b_id: 4}
        for n in (1, 3, 4):
            answers = await asyncio.to_thread(_c_find, app.scp.port, f"ACC{9000 + n}")
            assert [str(a.PatientName) for a in answers] == ["Doe^Jane^Anne^Mrs"], n
        assert {p.read_bytes() for p in await _archived(archive, 4)} == {order(n) for n in (1, 2, 3, 4)}
    finally:
        await app.stop()
