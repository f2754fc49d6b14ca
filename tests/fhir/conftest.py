"""Fixtures: sekmet as the EMR (one per test session: identifiers are unique per test), the engine
in-process with the shipped channels."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str) -> ModuleType:
    """The helper module beside this file (tests are not a package: `fhir` must stay fhir.resources)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


servers = _load("fhir_servers")
Sekmet = servers.Sekmet

TOKEN = servers.TOKEN


@pytest.fixture(scope="session")
def sekmet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sekmet]:
    server = Sekmet(tmp_path_factory.mktemp("sekmet"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sekmet_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sekmet]:
    server = Sekmet(tmp_path_factory.mktemp("sekmet-auth"), tokens=[TOKEN])
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sekmet_with_basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sekmet]:
    server = Sekmet(tmp_path_factory.mktemp("sekmet-basic"), users={"engine": servers.PASSWORD})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def engine_yaml(tmp_path: Path, channels: Path = ROOT / "channels") -> Path:
    """The shipped engine.yaml with short back-off (tests never wait minutes) and no DICOM SCP."""
    text = (ROOT / "engine.yaml").read_text()
    text = text.replace("channels_dir: channels", f"channels_dir: {channels}")
    text = text.replace("mappings_dir: mappings", f"mappings_dir: {ROOT / 'mappings'}")
    text = text.replace("backoff_base_seconds: 1", "backoff_base_seconds: 0.2")
    text = text.replace("backoff_cap_seconds: 300", "backoff_cap_seconds: 2")
    text = text.replace("dicom:                          # Modality", "dicom:  # Modality", 1)
    text = text.replace("  enabled: true\n", "  enabled: false\n", 1)
    path = tmp_path / "engine.yaml"
    path.write_text(text)
    if not (tmp_path / "mappings").exists():  # a destination's own `mapping:` is looked up beside engine.yaml
        (tmp_path / "mappings").symlink_to(ROOT / "mappings")
    return path


@contextlib.asynccontextmanager
async def running(tmp_path: Path, emr_base: str, channels: Path = ROOT / "channels", **env: str) -> AsyncIterator[Any]:
    from engine.runtime.app import EngineApp, default_registry
    from engine.runtime.config import load_config

    registry = default_registry()
    environ = dict(os.environ)
    environ.update({
        "ENGINE_STORAGE_URL": f"sqlite:///{tmp_path / 'engine.db'}",
        "ORDERS_MLLP_PORT": "0",
        "RESULTS_MLLP_PORT": "0",
        "DICOM_PORT": "0",
        "HTTP_PORT": "0",
        "MEDS_ARCHIVE_DIR": str(tmp_path / "meds-archive"),
        "ORDERS_ARCHIVE_DIR": str(tmp_path / "archive"),
        "RESULTS_OUTBOX_DIR": str(tmp_path / "outbox"),
        "EMR_FHIR_BASE": emr_base,
        "EMR_FHIR_AUTH": "none",
    })
    environ.update(env)
    loaded = load_config(engine_yaml(tmp_path, channels), registry, env=environ)
    app = EngineApp(loaded, registry)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@pytest.fixture
def engine_at(tmp_path: Path) -> Callable[..., Any]:
    """`async with engine_at(base_url, **env) as app:` the engine, its results channel to that EMR."""
    return lambda base, **env: running(tmp_path, base, **env)




@pytest.fixture
def kit() -> ModuleType:
    """The helpers: oru(), send(), settled(), uid(), FaultProxy, Sekmet."""
    return servers
