"""Access to the HTTP listener: `engine run` refuses an open listener without a token, and the
shipped configuration serves FHIR in on HTTP_PORT with ENGINE_API_TOKEN."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from engine.configfile import ConfigError
from engine.runtime.app import EngineApp, default_registry
from engine.runtime.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ENGINE_API_TOKEN", "BIND_HOST")}
    env.update({
        "ENGINE_STORAGE_URL": f"sqlite:///{tmp_path / 'engine.db'}",
        "ORDERS_MLLP_PORT": "0", "RESULTS_MLLP_PORT": "0", "DICOM_PORT": "0", "HTTP_PORT": "0",
        "ORDERS_ARCHIVE_DIR": str(tmp_path / "archive"), "RESULTS_OUTBOX_DIR": str(tmp_path / "outbox"),
        "MEDS_ARCHIVE_DIR": str(tmp_path / "meds"), "ENGINE_LOG_LEVEL": "WARNING",
    })
    env.update(extra)
    return env


def test_engine_run_refuses_an_empty_token_on_a_public_address(tmp_path: Path) -> None:
    env = _env(tmp_path, BIND_HOST="0.0.0.0")
    run = subprocess.run([sys.executable, "-m", "engine", "run", "-c", str(ROOT / "engine.yaml")], env=env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 1
    assert "without a token: set ENGINE_API_TOKEN" in run.stderr
    assert "nothing was started" in run.stderr
    check = subprocess.run([sys.executable, "-m", "engine", "check", "-c", str(ROOT / "engine.yaml")], env=env,
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert check.returncode == 1 and "engine.yaml" in check.stderr and "http" in check.stderr


def test_a_token_allows_a_public_address(tmp_path: Path) -> None:
    loaded = load_config(ROOT / "engine.yaml", default_registry(),
                         env=_env(tmp_path, BIND_HOST="0.0.0.0", ENGINE_API_TOKEN="t0ken"))
    assert loaded.engine.http.host == "0.0.0.0" and loaded.engine.http.token == "t0ken"
    assert "t0ken" not in repr(loaded.engine.http)


def test_http_source_without_the_listener_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "channels").mkdir()
    (tmp_path / "engine.yaml").write_text("dicom: {enabled: false}\n")
    (tmp_path / "channels" / "m.yaml").write_text("name: m\nsource: {type: http}\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "engine.yaml", default_registry(), env={})
    assert any("needs the HTTP listener" in str(p) and str(p).startswith("channels/m.yaml:2:")
               for p in info.value.problems), info.value.problems


async def test_shipped_configuration_takes_fhir_with_the_token(tmp_path: Path) -> None:
    reg = default_registry()
    app = EngineApp(load_config(ROOT / "engine.yaml", reg, env=_env(tmp_path, ENGINE_API_TOKEN="shipped-t")), reg)
    await app.start()
    try:
        port = app.port_of("emr-medications")
        statement = {"resourceType": "MedicationStatement", "id": "s1", "status": "active",
                     "subject": {"reference": "Patient/p9"}, "medicationCodeableConcept": {"text": "aspirin"}}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            refused = await client.post("/fhir/emr-medications", json=statement)
            resp = await client.post("/fhir/emr-medications", content=json.dumps(statement),
                                     headers={"Authorization": "Bearer shipped-t", "Content-Type": "application/json"})
        assert refused.status_code == 401
        assert resp.status_code == 201 and resp.json()["id"] == "s1"
    finally:
        await app.stop()


def test_the_shared_listener_is_one_endpoint_in_the_port_check(tmp_path: Path) -> None:
    (tmp_path / "channels").mkdir()
    (tmp_path / "engine.yaml").write_text("dicom: {enabled: false}\nhttp: {enabled: true, port: 18080}\n")
    for name in ("a", "b"):  # two HTTP channels share the listener: no clash
        (tmp_path / "channels" / f"{name}.yaml").write_text(f"name: {name}\nsource: {{type: http}}\n")
    assert len(load_config(tmp_path / "engine.yaml", default_registry(), env={}).channels) == 2
    (tmp_path / "channels" / "c.yaml").write_text("name: c\nsource: {type: mllp, port: 18080}\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "engine.yaml", default_registry(), env={})
    shown = [str(p) for p in info.value.problems]
    assert shown == [s for s in shown if "port 18080 is also used by the HTTP listener" in s] and len(shown) == 1


def test_engine_run_names_a_busy_http_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "engine", "run", "-c", str(ROOT / "engine.yaml")],
                             env=_env(tmp_path, HTTP_PORT=str(port)), capture_output=True, text=True, timeout=120,
                             cwd=ROOT)
    assert run.returncode == 1
    assert f"the HTTP listener cannot bind 127.0.0.1:{port}" in run.stderr and "Traceback" not in run.stderr
