"""Fixtures: the engine in-process with its HTTP listener on a free port and a FHIR channel."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.runtime.app import EngineApp, default_registry
from engine.runtime.config import load_config

CHANNEL = """\
name: meds
source: {type: http, max_body_bytes: 65536}
input: fhir
accept: [MedicationRequest, MedicationDispense, MedicationAdministration, MedicationStatement, Medication, Bundle]
destinations:
  - {name: archive, type: file, directory: archive, content: raw}
"""


def write_config(tmp_path: Path, *, token: str = "", host: str = "127.0.0.1", channels: dict[str, str] | None = None,
                 extra: str = "", url: str = "") -> Path:
    (tmp_path / "channels").mkdir(parents=True, exist_ok=True)
    (tmp_path / "mappings").mkdir(exist_ok=True)
    default_url = f"sqlite:///{tmp_path / 'e.db'}"
    (tmp_path / "engine.yaml").write_text(
        f"storage:\n  url: '{url or default_url}'\ndicom:\n  enabled: false\n"
        "delivery:\n  poll_interval_seconds: 0.05\n"
        f"http:\n  enabled: true\n  host: '{host}'\n  port: 0\n  token: '{token}'\n{extra}"
    )
    for name, text in (channels or {"meds": CHANNEL}).items():
        (tmp_path / "channels" / f"{name}.yaml").write_text(text)
    return tmp_path / "engine.yaml"


Started = Callable[..., Awaitable[tuple[EngineApp, httpx.AsyncClient]]]


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[Started]:
    """`await started(token=..., channels=...)`: a running engine and an httpx client on its listener."""
    running: list[tuple[EngineApp, httpx.AsyncClient]] = []

    async def start(**kwargs: Any) -> tuple[EngineApp, httpx.AsyncClient]:
        reg = default_registry()
        app = EngineApp(load_config(write_config(tmp_path, **kwargs), reg, env={}), reg)
        await app.start()
        assert app.http is not None
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http.port}", timeout=60)
        running.append((app, client))
        return app, client

    yield start
    for app, client in running:
        await client.aclose()
        await app.stop()


def med_request(rid: str = "mr1", *, status: str = "active", patient: str = "Patient/p1",
                authored: str = "2026-11-20", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": status,
        "intent": "order",
        "subject": {"reference": patient},
        "medicationCodeableConcept": {
            "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361",
                        "display": "amlodipine 5 MG Oral Tablet"}]
        },
        "authoredOn": authored,
        **extra,
    }


@pytest.fixture
def med() -> Callable[..., dict[str, Any]]:
    return med_request


@pytest.fixture
def meds_channel() -> str:
    return CHANNEL
