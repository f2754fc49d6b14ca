"""Configuration errors name file, line and key, and all of them are reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.configfile import ConfigError, substitute_env
from engine.hl7.adapter import HL7Adapter
from engine.runtime.config import load_config
from engine.runtime.destinations import file as file_destination
from engine.runtime.registry import Registry
from engine.runtime.sources import mllp as mllp_source


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    mllp_source.register(reg)
    file_destination.register(reg)
    reg.add_adapter(HL7Adapter)
    return reg


def write(tmp_path: Path, engine_yaml: str, **channels: str) -> Path:
    (tmp_path / "channels").mkdir()
    (tmp_path / "mappings").mkdir()
    (tmp_path / "engine.yaml").write_text(engine_yaml)
    for name, text in channels.items():
        (tmp_path / "channels" / f"{name}.yaml").write_text(text)
    return tmp_path / "engine.yaml"


GOOD_CHANNEL = """\
name: orders
source:
  type: mllp
  port: ${ORDERS_MLLP_PORT:-2575}
destinations:
  - name: archive
    type: file
    directory: out
"""


def test_good_config_loads_with_env_defaults_and_overrides(tmp_path: Path, registry: Registry) -> None:
    path = write(tmp_path, "dicom:\n  port: ${DICOM_PORT:-11112}\n", orders=GOOD_CHANNEL)
    loaded = load_config(path, registry, env={})
    assert loaded.engine.dicom.port == 11112
    assert loaded.channels[0].source.port == 2575
    assert loaded.storage_url.endswith("engine.db")
    loaded = load_config(path, registry, env={"ORDERS_MLLP_PORT": "3000", "ENGINE_STORAGE_URL": "sqlite:///x.db"})
    assert loaded.channels[0].source.port == 3000
    assert loaded.storage_url == "sqlite:///x.db"


def test_every_problem_is_reported_with_file_line_and_key(tmp_path: Path, registry: Registry) -> None:
    bad_channel = """\
name: orders
source:
  type: mllp
  port: 2575
  prot: 2
acept: [ORM^O01]
destinations:
  - name: archive
    type: fiel
  - name: out
    type: file
"""
    path = write(tmp_path, "storage:\n  urll: x\ndicom:\n  port: ${NO_SUCH_VAR}\n", orders=bad_channel)
    with pytest.raises(ConfigError) as info:
        load_config(path, registry, env={})
    shown = [str(p) for p in info.value.problems]
    assert "engine.yaml:2:3 storage.urll: unknown key; did you mean 'url'?" in shown
    assert any(s.startswith("engine.yaml:4:3 dicom.port: environment variable NO_SUCH_VAR is not set") for s in shown)
    assert any(s.startswith("channels/orders.yaml:6:1 acept: unknown key") for s in shown)
    assert any(s.startswith("channels/orders.yaml:5:3 source.prot: unknown key") for s in shown)
    assert any(s.startswith("channels/orders.yaml:9:5 destinations.0.type: unknown destination type 'fiel'")
               for s in shown)
    assert any(s.startswith("channels/orders.yaml:10:5 destinations.1") and "directory" in s
               and "required" in s for s in shown), shown


def test_two_channels_on_one_port_is_an_error(tmp_path: Path, registry: Registry) -> None:
    path = write(tmp_path, "", a=GOOD_CHANNEL, b=GOOD_CHANNEL.replace("name: orders", "name: other"))
    with pytest.raises(ConfigError) as info:
        load_config(path, registry, env={})
    assert any(str(p).startswith("channels/b.yaml:4:3 source.port: port 2575 is also used by channel orders")
               for p in info.value.problems), [str(p) for p in info.value.problems]


def test_yaml_syntax_error_cites_line(tmp_path: Path, registry: Registry) -> None:
    path = write(tmp_path, "storage:\n  url: [unclosed\n", orders=GOOD_CHANNEL)
    with pytest.raises(ConfigError) as info:
        load_config(path, registry, env={})
    assert str(info.value.problems[0]).startswith("engine.yaml:")
    assert "YAML syntax error" in str(info.value.problems[0])


def test_substitute_env_forms() -> None:
    missing: list[str] = []
    env = {"A": "1", "EMPTY": ""}
    assert substitute_env("${A}-${B:-two}-${EMPTY:-dflt}-${C}", env, missing) == "1-two-dflt-"
    assert missing == ["C"]
