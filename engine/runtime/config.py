"""engine.yaml and channels/*.yaml as typed models, validated once at load.

`load_config` returns everything `engine run` needs or raises ConfigError listing every problem
with file, line and key: engine.yaml, each channel, each source and destination block (validated
by the registered class's own model) and each mapping file the channels name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.configfile import ConfigError, Problem, YamlDocument, read_yaml, validate
from engine.runtime.registry import Registry


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StorageConfig(Strict):
    url: str = ""  # empty: a SQLite file next to engine.yaml
    sqlite_file: str = "engine.db"
    dedupe_window_hours: float = 168.0
    max_batch: int = Field(512, ge=1)


class DicomConfig(Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    ae_title: str = Field("ENGINE", min_length=1, max_length=16)
    allowed_callers: list[str] = []
    station_from_caller: bool = False


class WorklistConfig(Strict):
    retention_hours: float = 72.0  # finished items kept this long
    idle_days: float = 7.0  # scheduled items whose date is older than this are dropped
    purge_interval_minutes: float = 15.0


class DeliveryConfig(Strict):
    max_attempts: int = Field(10, ge=1)
    backoff_base_seconds: float = 1.0
    backoff_cap_seconds: float = 300.0
    poll_interval_seconds: float = 0.2
    stall_seconds: float = 300.0  # a claim older than this belongs to a dead process: take it back


class EngineConfig(Strict):
    storage: StorageConfig = StorageConfig()
    channels_dir: str = "channels"
    mappings_dir: str = "mappings"
    timezone: str = "UTC"
    log_level: str = "INFO"
    dicom: DicomConfig = DicomConfig()
    worklist: WorklistConfig = WorklistConfig()
    delivery: DeliveryConfig = DeliveryConfig()


class FilterConfig(Strict):
    types: list[str] = []  # only these message types go further (others: filtered, AA)
    when: list[str] = []  # every condition must hold, e.g. "PID-3 is not empty"


class DedupeConfig(Strict):
    enabled: bool = True


class ChannelConfig(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    enabled: bool = True
    source: dict[str, Any]
    accept: list[str] = []  # message types the channel takes; others are rejected with AR 200
    validate_structure: bool = Field(False, alias="validate")
    charset: str | None = None  # overrides MSH-18
    dedupe: DedupeConfig = DedupeConfig()
    filter: FilterConfig = FilterConfig()
    mappings: dict[str, str] = {}  # message type (or "*") -> mapping file under mappings_dir
    destinations: list[dict[str, Any]] = []

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


@dataclass
class ChannelSpec:
    config: ChannelConfig
    source: BaseModel
    destinations: list[BaseModel]
    file: Path
    mappings: dict[str, Any] = field(default_factory=dict)  # type -> compiled Mapping
    filter_conditions: list[Any] = field(default_factory=list)
    doc: YamlDocument | None = None  # where each key came from, for problems found across channels


@dataclass
class LoadedConfig:
    path: Path
    base_dir: Path
    engine: EngineConfig
    channels: list[ChannelSpec]

    @property
    def storage_url(self) -> str:
        if self.engine.storage.url:
            return self.engine.storage.url
        return f"sqlite:///{(self.base_dir / self.engine.storage.sqlite_file).resolve()}"


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def load_config(
    path: Path, registry: Registry, *, env: Mapping[str, str] | None = None, load_mappings: bool = True
) -> LoadedConfig:
    path = path.resolve()
    base = path.parent
    problems: list[Problem] = []
    doc, found = read_yaml(path, env=env, display=_rel(path, base))
    problems += found
    engine_cfg = EngineConfig()
    if doc is not None:
        parsed, found = validate(doc, EngineConfig)
        problems += found
        if parsed is not None:
            engine_cfg = parsed
    url_env = (env if env is not None else os.environ).get("ENGINE_STORAGE_URL")
    if url_env:
        engine_cfg.storage.url = url_env

    channels: list[ChannelSpec] = []
    channels_dir = base / engine_cfg.channels_dir
    if not channels_dir.is_dir():
        problems.append(Problem(_rel(path, base), 1, 1, "channels_dir", f"folder {channels_dir} does not exist"))
    else:
        seen: dict[str, str] = {}
        ports: dict[tuple[str, int], str] = {}
        for file in sorted(channels_dir.glob("*.y*ml")):
            spec, found = _load_channel(file, base, engine_cfg, registry, env, load_mappings)
            problems += found
            if spec is None:
                continue
            if spec.config.name in seen:
                problems.append(
                    spec.doc.problem(("name",), f"channel name {spec.config.name!r} is also used by "
                                     f"{seen[spec.config.name]}")  # type: ignore[union-attr]
                )
            seen[spec.config.name] = _rel(file, base)
            port = getattr(spec.source, "port", None)
            host = getattr(spec.source, "host", "")
            if spec.config.enabled and port:
                if (host, port) in ports:
                    problems.append(
                        spec.doc.problem(  # type: ignore[union-attr]
                            ("source", "port"), f"port {port} is also used by channel {ports[(host, port)]}"
                        )
                    )
                ports[(host, port)] = spec.config.name
            channels.append(spec)
    if problems:
        raise ConfigError(problems)
    return LoadedConfig(path=path, base_dir=base, engine=engine_cfg, channels=channels)


def _load_channel(
    file: Path,
    base: Path,
    engine_cfg: EngineConfig,
    registry: Registry,
    env: Mapping[str, str] | None,
    load_mappings: bool,
) -> tuple[ChannelSpec | None, list[Problem]]:
    doc, problems = read_yaml(file, env=env, display=_rel(file, base))
    if doc is None:
        return None, problems
    cfg, found = validate(doc, ChannelConfig)
    problems += found
    # the source and destination blocks are checked even when the channel level has errors
    raw = doc.data if isinstance(doc.data, dict) else {}
    source = None
    if isinstance(raw.get("source"), dict):
        source = _component(doc, ("source",), raw["source"], registry.sources, "source", problems)
    destinations = []
    names: set[str] = set()
    blocks = raw.get("destinations") if isinstance(raw.get("destinations"), list) else []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict):
            continue
        dest = _component(doc, ("destinations", i), block, registry.destinations, "destination", problems)
        if dest is not None:
            if dest.name in names:
                problems.append(doc.problem(("destinations", i, "name"), f"destination name {dest.name!r} repeats"))
            names.add(dest.name)
            destinations.append(dest)
    if cfg is None:
        return None, problems
    spec = ChannelSpec(config=cfg, source=source, destinations=destinations, file=file, doc=doc)  # type: ignore[arg-type]
    if load_mappings and cfg.mappings:
        _load_channel_mappings(doc, spec, base / engine_cfg.mappings_dir, base, problems)
    if cfg.filter.when:
        _compile_filters(doc, spec, problems)
    return (spec if source is not None else None), problems


def _component(
    doc: YamlDocument,
    loc: tuple[Any, ...],
    block: dict[str, Any],
    known: dict[str, type],
    what: str,
    problems: list[Problem],
) -> Any:
    kind = block.get("type")
    if kind not in known:
        choices = ", ".join(sorted(known)) or "none registered"
        problems.append(doc.problem((*loc, "type"), f"unknown {what} type {kind!r} (known: {choices})"))
        return None
    parsed, found = validate(doc, known[kind].Config, at=loc, data=block)
    problems += found
    return parsed


def _load_channel_mappings(
    doc: YamlDocument, spec: ChannelSpec, mappings_dir: Path, base: Path, problems: list[Problem]
) -> None:
    from engine.mapping import MappingConfigError, load_mapping

    cache: dict[Path, Any] = {}
    for mtype, name in spec.config.mappings.items():
        file = (mappings_dir / name).resolve()
        if not file.is_file():
            problems.append(doc.problem(("mappings", mtype), f"mapping file {_rel(file, base)} does not exist"))
            continue
        if file not in cache:
            try:
                cache[file] = load_mapping(file, tables_dir=mappings_dir / "tables")
            except MappingConfigError as exc:
                problems.extend(
                    Problem(_rel(Path(p.file), base), p.line, p.column, p.key, p.message) for p in exc.problems
                )
                cache[file] = None
        if cache[file] is not None:
            spec.mappings[mtype] = cache[file]


def _compile_filters(doc: YamlDocument, spec: ChannelSpec, problems: list[Problem]) -> None:
    from engine.mapping import compile_condition

    for i, text in enumerate(spec.config.filter.when):
        try:
            spec.filter_conditions.append(compile_condition(text))
        except ValueError as exc:
            problems.append(doc.problem(("filter", "when", i), f"bad condition: {exc}"))
