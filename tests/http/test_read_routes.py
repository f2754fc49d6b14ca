"""Contract C6: a destination's `http_router(db, channel)` is served by the one HTTP app, before
the generic write routes and behind the same bearer-token check."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import httpx
from sqlalchemy import func, select

from engine.runtime.app import EngineApp, default_registry
from engine.runtime.config import load_config


def _module() -> ModuleType:
    # a module of its own (not this test file): pydantic resolves the config model's annotations there
    src = '''
from typing import Any, ClassVar
from fastapi import APIRouter
from sqlalchemy import Engine, func, select
from engine.runtime.destinations.base import DestinationConfig, LocalDestination
from engine.store.models import Message

class Lister(LocalDestination):
    Config: ClassVar[type[DestinationConfig]] = DestinationConfig

    def apply(self, conn: Any, ctx: Any, outputs: list[Any]) -> None:
        pass

    def http_router(self, db: Engine, channel: str) -> APIRouter:
        router = APIRouter()
        table = Message.__table__

        @router.get(f"/fhir/{channel}/List")
        def listing(patient: str) -> dict[str, Any]:
            with db.connect() as conn:
                n = conn.execute(select(func.count()).select_from(table)
                                 .where(table.c.patient_id == f"Patient/{patient}")).scalar()
            return {"resourceType": "List", "status": "current", "mode": "working", "title": f"{n}"}

        @router.get(f"/fhir/{channel}/Patient/{{pid}}/$medication-list")
        def op(pid: str) -> dict[str, Any]:
            return {"resourceType": "List", "id": pid}

        @router.post(f"/fhir/{channel}/$reconcile")
        def reconcile() -> dict[str, Any]:
            return {"resourceType": "Parameters"}

        return router
'''
    path = Path(__file__).with_name("_c6_lister.py")
    name = "c6_lister"
    if name in sys.modules:
        return sys.modules[name]
    module = ModuleType(name)
    sys.modules[name] = module
    exec(compile(src, str(path), "exec"), module.__dict__)
    return module


CHANNEL = """\
name: meds
source: {type: http}
accept: [MedicationStatement]
destinations:
  - {name: records, type: lister}
"""


async def test_destination_routes_are_served_behind_the_token(tmp_path: Path) -> None:
    reg = default_registry()
    reg.add_destination("lister", _module().Lister)
    (tmp_path / "channels").mkdir()
    (tmp_path / "engine.yaml").write_text(f"storage:\n  url: sqlite:///{tmp_path / 'e.db'}\ndicom:\n  enabled: false\n"
                                          "http: {enabled: true, port: 0, token: tk}\n")
    (tmp_path / "channels" / "meds.yaml").write_text(CHANNEL)
    app = EngineApp(load_config(tmp_path / "engine.yaml", reg, env={}), reg)
    await app.start()
    try:
        assert app.http is not None
        auth = {"Authorization": "Bearer tk"}
        statement = {"resourceType": "MedicationStatement", "id": "s1", "status": "active",
                     "subject": {"reference": "Patient/p1"}, "medicationCodeableConcept": {"text": "aspirin"}}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http.port}", timeout=60) as client:
            posted = await client.post("/fhir/meds", json=statement, headers=auth)
            assert posted.status_code == 201
            listed = await client.get("/fhir/meds/List", params={"patient": "p1"}, headers=auth)
            assert listed.status_code == 200 and listed.json()["title"] == "1"
            op = await client.get("/fhir/meds/Patient/p1/$medication-list", headers=auth)
            assert op.status_code == 200 and op.json() == {"resourceType": "List", "id": "p1"}
            # a destination's route wins over the generic write route of the same shape (POST /fhir/<ch>/<Type>)
            reconcile = await client.post("/fhir/meds/$reconcile", headers=auth)
            assert reconcile.status_code == 200 and reconcile.json() == {"resourceType": "Parameters"}
            no_patient = await client.get("/fhir/meds/List", headers=auth)
            assert no_patient.status_code == 400
            assert no_patient.json()["issue"][0]["expression"] == ["query.patient"]
            anonymous = await client.get("/fhir/meds/List", params={"patient": "p1"})
            assert anonymous.status_code == 401
        assert app.db is not None
        from engine.store.models import Message

        table = Message.__table__  # type: ignore[attr-defined]
        with app.db.connect() as conn:
            assert conn.execute(select(func.count()).select_from(table)).scalar() == 1
    finally:
        await app.stop()
