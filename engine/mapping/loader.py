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

import difflib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from engine.configfile import ConfigError, Problem, YamlDocument
from engine.errors import SEGMENT_SEQUENCE_ERROR, ProcessingError, ProcessingWarning
from engine.mapping import paths as hp
from engine.mapping.compiler import compile_fields
from engine.mapping.conditions import ConditionError, Predicate, parse_condition
from engine.mapping.context import CompileContext, Evaluator, Settings, position
from engine.mapping.dicom_out import check_output, output_rules
from engine.mapping.formats import FORMATS, FormatRegistry
from engine.mapping.reading import Scope
from engine.mapping.schema import GROUP_KINDS, OUTPUTS, ExampleModel, MappingFile, SettingsModel, check


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
    warnings: list[dict[str, Any]] = field(default_factory=list)  # expected: {code, location, target, text}
    column: int = 1


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
        check: Callable[[dict[str, Any], list[ProcessingWarning]], dict[str, Any]] | None = None,
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
        self._check = check  # the output's own value rules (DICOM VRs), applied to every output

    def run(self, message: Any, warnings: list[ProcessingWarning] | None = None) -> list[dict[str, Any]]:
        """Map one message: one dict per `for_each` group, or one for the message ([] when `when` is false).

        Optional values that were dropped (or read although not sent as HL7 says) are appended
        to `warnings` as ProcessingWarning; without a list they are not kept.
        """
        if self._check is not None:
            found: list[ProcessingWarning] = [] if warnings is None else warnings
            check = self._check
            return [check(output, found) for output in self._run(message, found)]
        return self._run(message, warnings)

    def _run(self, message: Any, warnings: list[ProcessingWarning] | None) -> list[dict[str, Any]]:
        whole = Scope(message, message, warnings=warnings)
        if self._when is not None and not self._when(whole):
            return []
        if self.for_each is None:
            return [self._build(whole)]
        groups = message.groups(self.for_each)
        if self.for_each == "ORDER" and "\rOBR" not in whole.text:
            groups = []  # an ORC alone orders nothing: no procedure to schedule
        if not groups:
            if self.settings.empty_groups == "skip":
                return []
            if self.for_each == "ORDER":
                text, location = "no ORDER group (no ORC/OBR)", "OBR"
            else:
                text, location = "no OBSERVATION group (no OBX)", "OBX"
            raise ProcessingError(text, SEGMENT_SEQUENCE_ERROR, location, source=self._for_each_source)
        out = []
        for i, group in enumerate(groups, 1):
            try:
                out.append(self._build(whole.inner(group)))
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


def load_mapping(
    path: Path,
    tables_dir: Path | None = None,
    *,
    formats: FormatRegistry | None = None,
    inputs: Collection[str] = ("hl7v2",),
) -> Mapping:
    """Read, check and compile a mapping file; MappingConfigError lists every problem found.

    `inputs` are the input kinds the engine has adapters for (the registry's names): a mapping
    for any other input could never run.
    """
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
    doc = YamlDocument(path, data, display)

    header, problems = check(doc, MappingFile)
    if header is None:  # go on with what can be used, to report the problems further down too
        header = MappingFile.model_construct(
            name=None,
            description="",
            input="hl7v2",
            output=data["output"] if data.get("output") in OUTPUTS else "json",
            for_each=data.get("for_each") if data.get("for_each") in GROUP_KINDS else None,
            when=data.get("when") if isinstance(data.get("when"), str) else None,
            settings=data.get("settings") if isinstance(data.get("settings"), dict) else None,
            fields=data.get("fields"),
            examples=data["examples"] if isinstance(data.get("examples"), list) else [],
        )
    given = data.get("input")
    if isinstance(given, str) and given not in inputs:
        known = sorted(inputs)
        near = difflib.get_close_matches(given, known, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        problems.append(doc.problem(("input",), f"unknown input {given!r}{hint}; known: {', '.join(known) or 'none'}"))

    settings = Settings(keep_empty=header.output != "fhir")
    if header.settings is not None:
        parsed, found = check(doc, SettingsModel, ("settings",))
        problems += found
        if parsed is not None:
            settings = _settings(parsed, header.output)

    when = None
    if header.when is not None:
        try:
            when, _ = parse_condition(header.when, hp.compile_path, hp.is_list)
        except ConditionError as exc:
            problems.append(doc.problem(("when",), str(exc)))

    ctx = CompileContext(display, settings, tables_dir, formats or FORMATS, dicom=header.output == "dicom")
    build = compile_fields(data["fields"], ctx) if "fields" in data else (lambda scope: {})
    problems.extend(ctx.problems)
    examples = _examples(doc, header.examples, problems)

    if problems:
        problems.sort(key=lambda p: (p.line, p.column))
        raise MappingConfigError(problems)
    for_each_line = position(data, "for_each")[0] if "for_each" in data else 1
    vr_check = None
    if header.output == "dicom":  # every value valid for its VR before anything stores it
        required, locations = output_rules(data.get("fields"))

        def vr_check(output: dict[str, Any], warnings: list[ProcessingWarning]) -> dict[str, Any]:
            return check_output(output, required=required, warnings=warnings, locations=locations, source=display)

    return Mapping(
        name=header.name or path.stem,
        description=header.description,
        input=header.input,
        output=header.output,
        for_each=header.for_each,
        settings=settings,
        path=path,
        display=display,
        build=build,
        when=when,
        examples=examples,
        for_each_line=for_each_line,
        check=vr_check,
    )


def _settings(model: SettingsModel, output: str) -> Settings:
    return Settings(
        timezone=model.timezone or "",
        tzinfo=ZoneInfo(model.timezone) if model.timezone else None,
        study_uid_policy=model.study_uid_policy,
        uid_root=model.uid_root or "",
        coding_scheme=model.coding_scheme,
        local_code_system=model.local_code_system,
        keep_empty=model.keep_empty if model.keep_empty is not None else output != "fhir",
        empty_groups=model.empty_groups,
    )


def plain(node: Any) -> Any:
    """ruamel's commented containers -> plain dicts and lists."""
    if isinstance(node, dict):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    return node


def _examples(doc: YamlDocument, items: list[Any], problems: list[Problem]) -> list[Example]:
    out = []
    node = doc.data.get("examples")
    for i in range(len(items)):
        parsed, found = check(doc, ExampleModel, ("examples", i))
        problems += found
        if parsed is None:
            continue
        error = parsed.error.model_dump(exclude_none=True) if parsed.error is not None else None
        line, column = position(node, i)
        warnings = [w.model_dump(exclude_none=True) for w in parsed.warnings]
        out.append(Example(i + 1, line, parsed.message, plain(parsed.expect), error, parsed.description, warnings,
                           column))
    return out
