"""The read routes of a `medrec` destination (contract C6), included in the one HTTP app behind
its bearer-token check:

- `GET /fhir/<channel>/List?patient=<id>[&as-of=YYYY-MM-DD]`
- `GET /fhir/<channel>/Patient/<id>/$medication-list[?as-of=YYYY-MM-DD]`

Both answer the reconciled list as a FHIR List. They read through the store's read engine (a
SQLite snapshot that never waits for the message writer) in FastAPI's thread pool.
"""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING, Annotated, Any

import pydantic_core
from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Engine

from engine.medrec.fhir_list import build_list
from engine.store.db import make_read_engine

if TYPE_CHECKING:
    from engine.runtime.destinations.medrec import MedrecDestination

__all__ = ["FHIR_JSON", "medication_list_router", "operation_outcome"]

FHIR_JSON = "application/fhir+json"


def operation_outcome(status: int, text: str, expression: str, code: str = "invalid") -> JSONResponse:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text, "expression": [expression]}],
    }
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


def medication_list_router(dest: MedrecDestination, db: Engine, channel: str) -> APIRouter:
    from engine.runtime.destinations.medrec import patient_param

    reader = make_read_engine(db)
    router = APIRouter()

    def answer(patient: str | None, as_of: str | None) -> Any:
        if not patient or not patient.strip():
            return operation_outcome(400, "the patient search parameter is required", "patient", "required")
        day = None
        if as_of:
            try:
                day = date.fromisoformat(as_of)
            except ValueError:
                return operation_outcome(400, "as-of must be a date (YYYY-MM-DD)", "as-of")
        with reader.connect() as conn:
            result = dest.reconciliation(conn, channel, patient_param(patient), day)
        # built from stored, typed records: each shape is validated by the tests, not every answer
        # (fhir.resources took 3 ms of a 60-resource list, 40 times the building)
        # pydantic_core writes the List ~4x faster than JSONResponse's json.dumps (13 records: 80 -> 20 us)
        return Response(pydantic_core.to_json(build_list(result, validate=False)), media_type=FHIR_JSON)

    @router.get(f"/fhir/{channel}/List")
    def medication_list(
        patient: Annotated[str | None, Query()] = None,
        as_of: Annotated[str | None, Query(alias="as-of")] = None,
    ) -> Any:
        return answer(patient, as_of)

    @router.get(f"/fhir/{channel}/Patient/{{patient_id}}/$medication-list")
    def patient_medication_list(
        patient_id: str,
        as_of: Annotated[str | None, Query(alias="as-of")] = None,
    ) -> Any:
        return answer(patient_id, as_of)

    return router
