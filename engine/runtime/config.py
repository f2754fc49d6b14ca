"""engine.yaml and channels/*.yaml as typed models, validated once at load.

`load_config` returns everything `engine run` needs or raises ConfigError listing every problem
with file, line and key: engine.yaml, each channel, each source and destination block (validated
by the registered class's own model) and each mapping file the channels name.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.configfile import ConfigError, Problem, YamlDocument, read_yaml, validate
from engine.inputs import AdapterOptions
from engine.runtime.destinations.base import RAW, DestinationConfig, raw_of
from engine.runtime.registry import Registry
from engine.runtime.sources.base import SourceConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StorageConfig(Strict):
    url: str = ""  # empty: a SQLite file next to engine.yaml
    sqlite_file: str = "engine.db"
    dedupe_window_hours: float = 168.0
    max_batch: int = Field(512, ge=1)
    # at-rest encryption (engine.store.crypto); never echoed in an error
    key: str = Field("", repr=False)  # ENGINE_KEY: base64 of 32 bytes; empty: PHI stored unencrypted
    key_old: str = Field("", repr=False)  # ENGINE_KEY_OLD: older keys, for reading only (rotation)
    keyring: str = ""  # ENGINE_KEYRING: a 0600 key file instead, first line current


class DicomConfig(Strict):
    class TLS(Strict):
        """As an MLLP source's `tls:`; the key and certificate are PEM files."""

        cert: str
        key: str
        ca: str | None = None  # required with require_client_cert (mutual TLS)
        require_client_cert: bool = False

        def model_post_init(self, _context: Any) -> None:
            if self.require_client_cert and self.ca is None:
                raise ValueError("dicom.tls.require_client_cert needs ca (the CA that signs modality certificates)")

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    ae_title: str = Field("ENGINE", min_length=1, max_length=16)
    allowed_callers: list[str] = []  # exact AE titles; leading/trailing spaces are not significant
    check_called_aet: bool = True  # an association to another called AE title gets A-ASSOCIATE-RJ
    station_from_caller: bool = False
    max_associations: int = Field(32, ge=1)  # at the limit the association idle longest makes room
    max_associations_per_caller: int = Field(8, ge=1)
    idle_timeout_seconds: float | None = Field(300.0, gt=0)  # pynetdicom network_timeout; null: never
    acse_timeout_seconds: float = Field(30.0, gt=0)  # A-ASSOCIATE-RQ (and TLS handshake) within this
    dimse_timeout_seconds: float = Field(30.0, gt=0)
    tls: TLS | None = None


class WorklistConfig(Strict):
    retention_hours: float = 72.0  # finished items kept this long
    idle_days: float = 7.0  # scheduled items whose date is older than this are dropped
    purge_interval_minutes: float = 15.0


class DeliveryConfig(Strict):
    max_attempts: int = Field(10, ge=1)
    backoff_base_seconds: float = 1.0
    backoff_cap_seconds: float = 300.0
    poll_interval_seconds: float = 0.2
    # replaced by cluster.lease_seconds (a claim is renewed while it is worked on, not given a fixed
    # time); still accepted so that an engine.yaml that sets it loads, and ignored
    stall_seconds: float | None = None

    @model_validator(mode="after")
    def _stall_ignored(self) -> DeliveryConfig:
        if self.stall_seconds is not None:
            logging.getLogger(__name__).warning(
                "delivery.stall_seconds is ignored: delivery claims are leased and renewed (cluster.lease_seconds)")
        return self


class ClusterConfig(Strict):
    """Several engine processes on one PostgreSQL store (ENGINE_CLUSTER). Outside cluster mode a
    second process on the same store is refused."""

    enabled: bool = False
    node_name: str = Field("", max_length=200)  # ENGINE_NODE_NAME; empty: host name + process id
    heartbeat_seconds: float = Field(5.0, gt=0)  # node row, leader lease and claim leases renewed this often
    lease_seconds: float = Field(30.0, gt=0)  # a claim or the leadership not renewed this long has lapsed

    def model_post_init(self, _context: Any) -> None:
        if self.lease_seconds < 2 * self.heartbeat_seconds:
            raise ValueError("cluster.lease_seconds must be at least twice cluster.heartbeat_seconds")


class PacsConfig(Strict):
    """The PACS the poll asks for studies that came without MPPS (the imagingstudy destination has its own)."""

    host: str = "127.0.0.1"
    port: int = Field(4242, ge=1, le=65535)
    aet: str = Field("ORTHANC", min_length=1, max_length=16)
    qido_url: str = ""  # set: QIDO-RS instead of C-FIND
    timeout: float = Field(30.0, gt=0)
    poll_minutes: float = Field(10.0, ge=0)  # 0: no poll
    poll_days: int = Field(1, ge=0)  # StudyDate from this many days back to today
    channel: str = "pacs-studies"  # where FOUND units go; the poll runs only while it does


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpConfig(Strict):
    """The one HTTP listener (FHIR in, medication lists, health, metrics) every HTTP source shares."""

    enabled: bool = False  # the shipped engine.yaml turns it on; a channel with an http source needs it
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: str = Field("", repr=False)  # ENGINE_API_TOKEN; never echoed in an error
    max_body_bytes: int = Field(10 * 2**20, ge=1024)  # a larger body is refused with 413 while it arrives
    read_timeout: float = Field(30.0, gt=0)  # the whole body must arrive within this (else 408)
    max_connections: int = Field(256, ge=1)  # connections and requests in flight; past it new ones get 503
    audit: bool = True  # one row per request in http_audit (who, what, when, outcome; never the body)

    @model_validator(mode="after")
    def _token_or_loopback(self) -> HttpConfig:
        if self.enabled and not self.token and not is_loopback(self.host):
            raise ValueError(
                f"the HTTP listener would bind {self.host} without a token: set ENGINE_API_TOKEN "
                "(http.token) or bind a loopback address (BIND_HOST=127.0.0.1)"
            )
        return self


class EngineConfig(Strict):
    storage: StorageConfig = StorageConfig()
    channels_dir: str = "channels"
    mappings_dir: str = "mappings"
    timezone: str = "UTC"
    log_level: str = "INFO"
    dicom: DicomConfig = DicomConfig()
    worklist: WorklistConfig = WorklistConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    pacs: PacsConfig = PacsConfig()
    http: HttpConfig = HttpConfig()
    cluster: ClusterConfig = ClusterConfig()


class FilterConfig(Strict):
    types: list[str] = []  # only these message types go further (others: filtered, AA)
    when: list[str] = []  # every condition must hold, e.g. "PID-3 is not empty"


class DedupeConfig(Strict):
    enabled: bool = True


# channel keys that moved into a block of their own, and where to write them now
MOVED_KEYS = {
    "validate": "input.validate (input: {type: hl7v2, validate: true})",
    "charset": "input.charset (input: {type: hl7v2, charset: ISO-8859-1})",
}


class ChannelConfig(Strict):
    """The protocol-neutral part of a channel file; `source`, `input` and each destination are
    blocks validated by their registered component's own model."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    enabled: bool = True
    source: dict[str, Any]
    input: str | dict[str, Any] | None = None  # input kind (hl7v2 ...) and its options; default: the source's
    accept: list[str] = []  # message types the channel takes; others are rejected (HL7: AR 200)
    dedupe: DedupeConfig = DedupeConfig()
    filter: FilterConfig = FilterConfig()
    mappings: dict[str, str] = {}  # message type (or "*") -> mapping file under mappings_dir
    destinations: list[dict[str, Any]] = []


@dataclass
class ChannelSpec:
    config: ChannelConfig
    source: SourceConfig
    input: AdapterOptions
    destinations: list[DestinationConfig]
    file: Path
    doc: YamlDocument  # where each key came from, for problems found across channels
    mappings: dict[str, Any] = field(default_factory=dict)  # type -> compiled Mapping
    filter_conditions: list[Any] = field(default_factory=list)


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
    path: Path,
    registry: Registry,
    *,
    env: Mapping[str, str] | None = None,
    load_mappings: bool = True,
    problems_out: list[Problem] | None = None,
) -> LoadedConfig:
    """Every stage is checked even when an earlier one has problems: all of them are reported in
    one run, sorted by file and line. With `problems_out`, they are added there instead of raised
    and what did load is returned (`engine check` then runs the mappings' examples too)."""
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
        listening: dict[tuple[str, int], str] = {}
        taken: dict[str, str] = {}
        if engine_cfg.dicom.enabled and engine_cfg.dicom.port:
            listening[(engine_cfg.dicom.host, engine_cfg.dicom.port)] = "the DICOM listener (engine.yaml dicom.port)"
        if engine_cfg.http.enabled and engine_cfg.http.port:  # one listener, shared by every http source
            where = (engine_cfg.http.host, engine_cfg.http.port)
            if where in listening:
                problems.append(Problem(_rel(path, base), 1, 1, "http.port",
                                        f"port {where[1]} is also used by {listening[where]}"))
            listening[where] = "the HTTP listener (engine.yaml http.port)"
        for file in sorted(channels_dir.glob("*.y*ml")):
            spec, found = _load_channel(file, base, engine_cfg, registry, env, load_mappings)
            problems += found
            if spec is None:
                continue
            chdoc = spec.doc
            if spec.config.name in seen:
                other = seen[spec.config.name]
                problems.append(chdoc.problem(("name",), f"channel name {spec.config.name!r} is also used by {other}"))
            seen[spec.config.name] = _rel(file, base)
            shared = getattr(registry.sources.get(spec.source.type), "uses_http_app", False)
            if spec.config.enabled and shared and not engine_cfg.http.enabled:
                problems.append(chdoc.problem(("source", "type"), "the http source needs the HTTP listener: "
                                              "set http.enabled: true in engine.yaml"))
            if spec.config.enabled:
                problems += _one_channel_only(spec, registry, taken)
                for ep in spec.source.endpoints():
                    if not ep.port:
                        continue
                    if (ep.host, ep.port) in listening:
                        user = listening[(ep.host, ep.port)]
                        problems.append(chdoc.problem(("source", "port"), f"port {ep.port} is also used by {user}"))
                    listening[(ep.host, ep.port)] = f"channel {spec.config.name}"
            channels.append(spec)
        polled = next((c for c in channels if c.config.name == engine_cfg.pacs.channel), None)
        if engine_cfg.pacs.poll_minutes and polled is not None and polled.input.type != "dicom":
            problems.append(Problem(_rel(path, base), 1, 1, "pacs.channel",
                                    f"channel {polled.config.name!r} takes {polled.input.type}, not the PACS poll's "
                                    "dicom units"))
    problems.sort(key=lambda p: (p.file, p.line, p.column))
    if problems_out is not None:
        problems_out.extend(problems)
    elif problems:
        raise ConfigError(problems)
    return LoadedConfig(path=path, base_dir=base, engine=engine_cfg, channels=channels)


def _one_channel_only(spec: ChannelSpec, registry: Registry, taken: dict[str, str]) -> list[Problem]:
    """A source that serves one channel per engine (`one_channel_only`, e.g. the DICOM SCP's MPPS)."""
    kind = spec.source.type
    if not getattr(registry.sources.get(kind), "one_channel_only", False):
        return []
    if kind in taken:
        return [spec.doc.problem(("source", "type"), f"only one enabled channel may have a {kind} source "
                                 f"(channel {taken[kind]} has one)")]
    taken[kind] = spec.config.name
    return []


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
    raw: dict[str, Any] = dict(doc.data) if isinstance(doc.data, dict) else {}
    for key, place in MOVED_KEYS.items():
        if key in raw:
            problems.append(doc.problem((key,), f"this key has moved: write it as {place}"))
            raw.pop(key)
    cfg, found = validate(doc, ChannelConfig, data=raw)
    problems += found
    # every block is checked even when the channel level has errors: all problems in one run
    source = None
    if isinstance(raw.get("source"), dict):
        source = _component(doc, ("source",), raw["source"], registry, "source", problems)
    options = _input(doc, raw, source, registry, problems)
    destinations: list[DestinationConfig] = []
    names: set[str] = set()
    blocks = raw.get("destinations") if isinstance(raw.get("destinations"), list) else []
    for i, block in enumerate(blocks or []):
        if not isinstance(block, dict):
            continue
        dest = _component(doc, ("destinations", i), block, registry, "destination", problems)
        if dest is not None:
            # files a destination reads at start (a code table) are checked here, so `engine check` says so
            check = getattr(registry.destinations[dest.type], "check_files", None)
            for text in check(dest, base) if check is not None else []:
                problems.append(doc.problem(("destinations", i), text))
            if dest.name in names:
                problems.append(doc.problem(("destinations", i, "name"), f"destination name {dest.name!r} repeats"))
            names.add(dest.name)
            destinations.append(dest)
    mappings: dict[str, Any] = {}
    if load_mappings and isinstance(raw.get("mappings"), dict):
        folder = base / engine_cfg.mappings_dir
        mappings = _load_channel_mappings(doc, raw["mappings"], folder, base, registry, problems)
    conditions: list[Any] = []
    when = raw.get("filter", {}).get("when") if isinstance(raw.get("filter"), dict) else None
    if isinstance(when, list):
        conditions = _compile_filters(doc, when, problems)
    if cfg is None or source is None or options is None:
        return None, problems
    spec = ChannelSpec(
        config=cfg,
        source=source,
        input=options,
        destinations=destinations,
        file=file,
        mappings=mappings,
        filter_conditions=conditions,
        doc=doc,
    )
    problems += _check_routes(doc, spec, registry, load_mappings)
    return spec, problems


def _input(
    doc: YamlDocument, raw: dict[str, Any], source: Any, registry: Registry, problems: list[Problem]
) -> AdapterOptions | None:
    """The channel's input kind and its options (`input: hl7v2` or `input: {type: hl7v2, ...}`)."""
    block = raw.get("input")
    if block is None:
        kind = getattr(registry.sources.get(source.type), "default_input", None) if source is not None else None
        block = {"type": kind} if kind else None
        if block is None:
            if source is not None:
                problems.append(doc.problem(("input",), "name the input kind (e.g. input: hl7v2)"))
            return None
    elif isinstance(block, str):
        block = {"type": block}
    if not isinstance(block, dict):
        return None
    options = _component(doc, ("input",), block, registry, "input", problems)
    return options if isinstance(options, AdapterOptions) else None


def _component(
    doc: YamlDocument,
    loc: tuple[Any, ...],
    block: dict[str, Any],
    registry: Registry,
    what: str,
    problems: list[Problem],
) -> Any:
    kind = block.get("type")
    model = registry.config_model(what, kind) if isinstance(kind, str) else None
    if model is None:
        known = registry.known(what)
        close = difflib.get_close_matches(str(kind), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        choices = ", ".join(known) or "none registered"
        at = (*loc, "type") if what != "input" or "type" in block else loc
        problems.append(doc.problem(at, f"unknown {what} type {kind!r} (known: {choices}){hint}"))
        return None
    parsed, found = validate(doc, model, at=loc, data=block)
    problems += found
    return parsed


def _check_routes(doc: YamlDocument, spec: ChannelSpec, registry: Registry, mappings_loaded: bool) -> list[Problem]:
    """Each destination must be able to take what reaches it: the raw unit, or the output kind of
    the mapping for every message type routed to it."""
    problems: list[Problem] = []
    kind = spec.input.type
    for mtype, mapping in spec.mappings.items():
        if mapping.input != kind:
            problems.append(
                doc.problem(("mappings", mtype), f"mapping {mapping.name} reads {mapping.input} input, "
                            f"but this channel's input is {kind}")
            )
    fed = _check_emits(doc, spec, registry, problems)
    for i, dest in enumerate(spec.destinations):
        takes = registry.destinations[dest.type].takes(dest)
        if RAW in takes or raw_of(kind) in takes or dest.name in fed:
            continue
        raw_only = {t for t in takes if t.startswith(RAW)}
        if raw_only:
            inputs = ", ".join(sorted(t.split(":", 1)[1] for t in raw_only))
            problems.append(
                doc.problem(("destinations", i, "type"), f"destination {dest.name!r} ({dest.type}) forwards {inputs} "
                            f"as received and cannot take this channel's {kind} input")
            )
            continue
        if not mappings_loaded:
            continue
        types = dest.types or spec.config.accept or sorted(spec.config.mappings)
        wants = f"destination {dest.name!r} ({dest.type}) takes {'/'.join(sorted(takes))} outputs"
        for mtype in types:
            mapping = spec.mappings.get(mtype) or spec.mappings.get("*")
            if mapping is None:
                if mtype in spec.config.mappings or "*" in spec.config.mappings:
                    continue  # the mapping itself failed to load: reported already
                missing = f"{wants}, but {mtype} has no mapping (add it under mappings:)"
                problems.append(doc.problem(("destinations", i, "type"), missing))
            elif mapping.output not in takes:
                problems.append(
                    doc.problem(("destinations", i, "type"),
                                f"{wants}, but mapping {mapping.name} for {mtype} makes {mapping.output}")
                )
    return problems


def _check_emits(doc: YamlDocument, spec: ChannelSpec, registry: Registry, problems: list[Problem]) -> set[str]:
    """A local destination that emits payloads (C2) names queued destinations of its channel;
    those take only what it emits. Returns their names."""
    kinds = {d.name: registry.destinations[d.type].kind for d in spec.destinations}
    fed: set[str] = set()
    for i, dest in enumerate(spec.destinations):
        emits = getattr(registry.destinations[dest.type], "emits", None)
        for name in emits(dest) if emits is not None else []:
            if kinds.get(name) != "queued":
                what = "is not a destination of this channel" if name not in kinds else "is not a queued destination"
                text = f"destination {dest.name!r} sends to {name!r}, which {what}"
                problems.append(doc.problem(("destinations", i), text))
            fed.add(name)
    return fed


def _load_channel_mappings(
    doc: YamlDocument,
    table: dict[str, Any],
    mappings_dir: Path,
    base: Path,
    registry: Registry,
    problems: list[Problem],
) -> dict[str, Any]:
    from engine.mapping import MappingConfigError, load_mapping

    loaded: dict[str, Any] = {}
    cache: dict[Path, Any] = {}
    for mtype, name in table.items():
        if not isinstance(name, str):
            continue
        file = (mappings_dir / name).resolve()
        if not file.is_file():
            problems.append(doc.problem(("mappings", mtype), f"mapping file {_rel(file, base)} does not exist"))
            continue
        if file not in cache:
            try:
                cache[file] = load_mapping(file, tables_dir=mappings_dir / "tables", inputs=registry.known("input"))
            except MappingConfigError as exc:
                problems.extend(
                    Problem(_rel(Path(p.file), base), p.line, p.column, p.key, p.message) for p in exc.problems
                )
                cache[file] = None
        if cache[file] is not None:
            loaded[str(mtype)] = cache[file]
    return loaded


def _compile_filters(doc: YamlDocument, when: list[Any], problems: list[Problem]) -> list[Any]:
    from engine.mapping import compile_condition

    conditions = []
    for i, text in enumerate(when):
        try:
            conditions.append(compile_condition(str(text)))
        except ValueError as exc:
            problems.append(doc.problem(("filter", "when", i), f"bad condition: {exc}"))
    return conditions
