"""Fixtures: a real Orthanc (the PACS) and a real sekmet (the EMR), one each per test session (every
test uses its own study, patient and accession), and a store with the durable queue."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

HERE = Path(__file__).resolve().parent


def _load(name: str, folder: Path = HERE) -> ModuleType:
    """A helper module beside the tests (tests are not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


orthanc_kit = _load("orthanc")
fhir_kit = _load("fhir_servers", HERE.parent / "fhir")


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[orthanc_kit.Orthanc]:
    server = orthanc_kit.Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def emr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fhir_kit.Sekmet]:
    server = fhir_kit.Sekmet(tmp_path_factory.mktemp("sekmet"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kit() -> ModuleType:
    """StudyPlan, SeriesPlan (tests/pacs/orthanc.py)."""
    return orthanc_kit
