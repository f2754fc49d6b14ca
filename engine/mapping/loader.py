"""Loading a mapping file: check everything, report every problem with its line, compile once.

A mapping file (one kind of input -> one kind of output):

    name: orm-to-worklist
    input: hl7v2
    output: dicom                 # dicom | fhir | json
    for_each: ORDER               # optional: one output per ORDER / OBSERVATION group
    when: MSH-9.1 in [ORM, OMI]   # optional: message-level condition (false -> no output)
    settings: {timezone: Europe/Berlin, study_uid_policy: accession_based}
    fields:
      control:
        order_control: {from: ORC-1, required: true}
      dataset:
        PatientID: {from: PID-3.1, required: true}
        PatientName: {from: PID-5, format: xpn_to_pn}
        ScheduledProcedureStepSequence:
          - Modality: {from: [IPC-5, OBR-24]}
    examples:
      - message: samples/hl7/orm_o01_ct.hl7
        expect: {dataset: {PatientID: "100234"}}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from engine.configfile import ConfigError, Problem
from engine.errors import SEGMENT_SEQUENCE_ERROR, ProcessingError
from engine.mapping import paths as hp
from engine.mapping.compiler import CompileContext, Evaluator, Scope, Settings, compile_fields, position
from engine.mapping.conditions import ConditionError, Predicate, parse_condition
from engine.mapping.formats import FORMATS, FormatRegistry, valid_uid

TOP_KEYS = ("name", "description", "input", "output", "for_each", "when", "settings", "fields", "examples")
OUTPUTS = ("dicom", "fhir", "json")
GROUP_KINDS = ("ORDER", "OBSERVATION")
POLICIES = ("accession_based", "generate", "reject")
EXAMPLE_KEYS = ("message", "expect", "error", "description")


class MappingConfigError(ConfigError):
    """Every problem found in a mapping file (file, line, column, key, message)."""


@dataclass
class Example:
    number: int  # 1-based, as an analyst counts
    line: int
    message: str  # inline ER7 or a path (relative to the mapping or the repository)
    expect: Any = None  # list of outputs, or a dict checked against the first output
    error: dict[str, Any] | None = None  # expected refusal: {code, location, text}
    description: str = ""


class Mapping:
    """A compiled mapping; `run` is the hot path (no parsing or lookups by name left in it)."""

    def __init__(
        self,
        *,
        name: str,
        description: str,
        input: str,
        output: str,
        for_each: str | None,
        settings: Settings,
        path: Path,
        display: str,
        build: Evaluator,
        when: Predicate | None,
        examples: list[Example],
        for_each_line: int,
    ) -> None:
        self.name = name
        self.description = description
        self.input = input
        self.output = output
        self.for_each = for_each
        self.settings = settings
        self.path = path
        self.display = display
        self.examples = examples
        self._build = build
        self._when = when
        self._for_each_source = f"{display}:{for_each_line}"

    def run(self, message: Any) -> list[dict[str, Any]]:
        """Map one message: one dict per `for_each` group, or one for the message ([] when `when` is false)."""
        whole = Scope(message, message)
        if self._when is not None and not self._when(whole):
            return []
        if self.for_each is None:
            return [self._build(whole)]
        groups = message.groups(self.for_each)
        if not groups:
            if self.settings.empty_groups == "skip":
                return []
            raise ProcessingError(
                f"message has no {self.for_each} group to map",
                SEGMENT_SEQUENCE_ERROR,
                "ORC" if self.for_each == "ORDER" else "OBX",
                source=self._for_each_source,
            )
        out = []
        for i, group in enumerate(groups, 1):
            try:
                out.append(self._build(Scope(group, message, whole.text, whole.top_memo)))
            except ProcessingError as exc:
                if len(groups) > 1:
                    exc.text = f"{exc.text} ({self.for_each} group {i})"
                    exc.args = (exc.text,)
                raise
        return out

    def __repr__(self) -> str:
        return f"<Mapping {self.name} {self.input}->{self.output} ({self.display})>"


def display_name(path: Path) -> str:
    """'mappings/x.yaml': the form rule sources are cited in."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def load_mapping(path: Path, tables_dir: Path | None = None, *, formats: FormatRegistry | None = None) -> Mapping:
    """Read, check and compile a mapping file; MappingConfigError lists every problem found."""
    path = Path(path)
    display = display_name(path)
    if tables_dir is None:
        tables_dir = path.parent / "tables"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MappingConfigError([Problem(display, 1, 1, "", f"cannot read file: {exc.strerror}")]) from None
    try:
        data = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise MappingConfigError([Problem(display, line, col, "", f"YAML syntax error: {exc.problem}")]) from None
    except YAMLError as exc:
        raise MappingConfigError([Problem(display, 1, 1, "", f"YAML error: {exc}")]) from None
    if not isinstance(data, dict):
        raise MappingConfigError([Problem(display, 1, 1, "", "a mapping file is a YAML mapping (name:, fields: ...)")])

    problems: list[Problem] = []

    def bad(key: Any, message: str, node: Any = data, keypath: str | None = None) -> None:
        line, col = position(node, key)
        problems.append(Problem(display, line, col, keypath or str(key), message))

    for key in data:
        if key not in TOP_KEYS:
            bad(key, f"unknown key (known: {', '.join(TOP_KEYS)})")
    for key in ("input", "output", "fields"):
        if key not in data:
            problems.append(Problem(display, 1, 1, key, "required key is missing"))
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        bad("name", "name must be text")
        name = path.stem
    description = data.get("description") or ""
    if "input" in data and data["input"] != "hl7v2":
        bad("input", "input must be hl7v2")
    output = data.get("output", "json")
    if "output" in data and output not in OUTPUTS:
        bad("output", f"output must be one of {', '.join(OUTPUTS)}")
        output = "json"
    for_each = data.get("for_each")
    if for_each is not None and for_each not in GROUP_KINDS:
        bad("for_each", f"for_each must be one of {', '.join(GROUP_KINDS)}")
        for_each = None

    settings = _settings(data, output, bad)

    when = None
    if "when" in data:
        try:
            when, _ = parse_condition(data["when"], hp.compile_path, hp.is_list)
        except ConditionError as exc:
            bad("when", str(exc))

    ctx = CompileContext(display, settings, tables_dir, formats or FORMATS, dicom=output == "dicom")
    build = compile_fields(data.get("fields"), ctx) if "fields" in data else (lambda scope: {})
    problems.extend(ctx.problems)
    examples = _examples(data, bad)

    if problems:
        problems.sort(key=lambda p: (p.line, p.column))
        raise MappingConfigError(problems)
    for_each_line = position(data, "for_each")[0] if "for_each" in data else 1
    return Mapping(
        name=name,
        description=str(description),
        input="hl7v2",
        output=output,
        for_each=for_each,
        settings=settings,
        path=path,
        display=display,
        build=build,
        when=when,
        examples=examples,
        for_each_line=for_each_line,
    )


def _settings(data: Any, output: str, bad: Any) -> Settings:
    s = Settings(keep_empty=output != "fhir")
    node = data.get("settings")
    if node is None:
        return s
    if not isinstance(node, dict):
        bad("settings", "settings must be a mapping")
        return s
    known = (
        "timezone",
        "study_uid_policy",
        "uid_root",
        "coding_scheme",
        "local_code_system",
        "keep_empty",
        "empty_groups",
    )
    for key, value in node.items():
        kp = f"settings.{key}"
        if key not in known:
            bad(key, f"unknown setting (known: {', '.join(known)})", node, kp)
        elif key == "timezone":
            try:
                s.tzinfo = ZoneInfo(str(value))
                s.timezone = str(value)
            except (ZoneInfoNotFoundError, ValueError):
                bad(key, f"unknown time zone {value!r} (use an IANA name like Europe/Berlin)", node, kp)
        elif key == "study_uid_policy":
            if value not in POLICIES:
                bad(key, f"study_uid_policy must be one of {', '.join(POLICIES)}", node, kp)
            else:
                s.study_uid_policy = value
        elif key == "uid_root":
            root = str(value)
            if not valid_uid(root) or len(root) > 40:
                bad(key, "uid_root must be a UID root (digits and dots, at most 40 characters)", node, kp)
            else:
                s.uid_root = root
        elif key == "keep_empty":
            if not isinstance(value, bool):
                bad(key, "keep_empty must be true or false", node, kp)
            else:
                s.keep_empty = value
        elif key == "empty_groups":
            if value not in ("error", "skip"):
                bad(key, "empty_groups must be error or skip", node, kp)
            else:
                s.empty_groups = value
        else:
            if not isinstance(value, str):
                bad(key, f"{key} must be text", node, kp)
            else:
                setattr(s, key, value)
    return s


def plain(node: Any) -> Any:
    """ruamel's commented containers -> plain dicts and lists."""
    if isinstance(node, dict):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    return node


def _examples(data: Any, bad: Any) -> list[Example]:
    node = data.get("examples")
    if node is None:
        return []
    if not isinstance(node, list):
        bad("examples", "examples must be a list of {message:, expect:}")
        return []
    out = []
    for i, item in enumerate(node):
        kp = f"examples[{i}]"
        line = position(node, i)[0]
        if not isinstance(item, dict):
            bad(i, "an example is {message: ..., expect: ...}", node, kp)
            continue
        for key in item:
            if key not in EXAMPLE_KEYS:
                bad(key, f"unknown key in example (known: {', '.join(EXAMPLE_KEYS)})", item, f"{kp}.{key}")
        msg = item.get("message")
        if not isinstance(msg, str) or not msg.strip():
            bad(i, "example needs message: (inline ER7 or a file like samples/hl7/x.hl7)", node, kp)
            continue
        if "expect" not in item and "error" not in item:
            bad(i, "example needs expect: (outputs) or error: (expected refusal)", node, kp)
            continue
        error = item.get("error")
        if error is not None and not isinstance(error, dict):
            bad("error", "error must be a mapping like {code: 101, location: OBR-18}", item, f"{kp}.error")
            continue
        out.append(
            Example(
                i + 1,
                line,
                msg,
                plain(item.get("expect")),
                plain(error) if error else None,
                str(item.get("description") or ""),
            )
        )
    return out
