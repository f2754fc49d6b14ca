"""What compiling and running a rule share: settings, problem collection, rule identity."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from zoneinfo import ZoneInfo

from engine.configfile import Problem
from engine.errors import ProcessingError, ProcessingWarning
from engine.mapping import paths as hp
from engine.mapping.formats import FORMATS, FormatRegistry
from engine.mapping.tables import CodeTable

OMIT: Any = object()  # a rule whose `when:` is false leaves its target out

Evaluator = Callable[[Any], Any]


@dataclass
class Settings:
    timezone: str = ""
    tzinfo: ZoneInfo | None = None
    study_uid_policy: str = "accession_based"
    uid_root: str = ""
    coding_scheme: str = "L"  # CodingSchemeDesignator when a CWE carries no coding system
    local_code_system: str = ""  # FHIR system for local codes
    keep_empty: bool = True  # keep "" targets (DICOM type 2); fhir outputs drop them
    empty_groups: str = "error"  # for_each found no group: error (100) or skip


FALSY_EMPTY = frozenset({str, list, tuple, dict, type(None)})  # 0 and False are values, not empty

CONTAINERS = frozenset({list, tuple, dict})


def is_empty(v: Any) -> bool:
    if v.__class__ is str:
        return not v
    if v is None:
        return True
    if isinstance(v, list | tuple):
        return all(is_empty(x) for x in v)
    if isinstance(v, dict):
        return all(is_empty(x) for x in v.values())
    return False


def location_for(path_texts: list[str], scope: Any) -> str:
    """ERR-2 location: the first path whose segment the message has (else the first path)."""
    for text in path_texts:
        try:
            if scope.segments(hp.segment_of(text)):
                return text
        except Exception:  # noqa: BLE001 - a location is best effort, never a second failure
            break
    return path_texts[0] if path_texts else ""


ON_INVALID = ("drop", "reject")


class InvalidValue(ProcessingError):
    """A value that fails its format or table: the rule's `on_invalid` decides (drop or reject).

    `reason` is the text without the target name, for the warning.
    """

    def __init__(self, reason: str, code: int, target: str, source: str, location: str = "") -> None:
        super().__init__(f"{target}: {reason}", code, location, source=source)
        self.reason = reason


def add_warning(scope: Any, warning: ProcessingWarning) -> None:
    """Record a warning for this run (once: a message-level rule runs again in every group)."""
    found = scope.warnings
    if found is not None and warning not in found:
        found.append(warning)


class RuleContext:
    """What a format knows about the rule it runs in (static; shared by every message)."""

    __slots__ = ("target", "source", "paths", "settings", "options")

    def __init__(
        self, target: str, source: str, paths: list[str], settings: Settings, options: dict[str, list[tuple[str, Any]]]
    ) -> None:
        self.target = target
        self.source = source
        self.paths = paths
        self.settings = settings
        self.options = options

    def fail(self, code: int, text: str, *, location: str = "") -> NoReturn:
        """Refuse the message whatever the rule's on_invalid says (e.g. a value that cannot be derived)."""
        raise ProcessingError(f"{self.target}: {text}", code, location, source=self.source)

    def invalid(self, code: int, text: str, *, location: str = "") -> NoReturn:
        """The value is not valid (102 data type, 103 table): dropped with a warning or refused, as
        the rule's on_invalid says; a `from:` chain tries its next field first."""
        raise InvalidValue(text, code, self.target, self.source, location)

    def warn(self, scope: Any, code: int, text: str, value: Any = None) -> None:
        """The value was used, but not as sent (e.g. an ISO 8601 time where HL7 wants a DTM)."""
        add_warning(scope, ProcessingWarning(text, code, self.location_of(value, scope), self.source, self.target))

    def location_of(self, value: Any, scope: Any) -> str:
        """The path this value was read from (the first one that holds it), for a warning."""
        where = getattr(value, "text", None)  # a Parts knows its field
        if isinstance(where, str):
            return where
        for text in self.paths:
            try:
                got = scope.get(hp.compile_path(text))
            except Exception:  # noqa: BLE001 - a location is best effort
                break
            if got and (value is None or got == value):
                return text
        return location_for(self.paths, scope)

    def option_value(self, name: str, scope: Any) -> str:
        for _text, path in self.options.get(name, ()):
            v = scope.get(path)
            if v:
                return v
        return ""

    def option_location(self, name: str, scope: Any) -> str:
        return location_for([t for t, _ in self.options.get(name, ())], scope)


@dataclass
class CompileContext:
    display: str  # "mappings/x.yaml"
    settings: Settings
    tables_dir: Path | None
    formats: FormatRegistry = field(default_factory=lambda: FORMATS)
    dicom: bool = False
    problems: list[Problem] = field(default_factory=list)
    tables: dict[str, CodeTable] = field(default_factory=dict)

    def problem(self, node: Any, key: Any, keypath: str, message: str) -> None:
        line, col = position(node, key)
        self.problems.append(Problem(self.display, line, col, keypath, message))


def position(node: Any, key: Any) -> tuple[int, int]:
    """1-based line and column of `key` in a ruamel mapping (or item `key` of a sequence)."""
    try:
        if isinstance(key, int) and isinstance(node, list):
            ln, cl = node.lc.item(key)  # type: ignore[attr-defined]  # a ruamel CommentedSeq
        elif key is None:
            ln, cl = node.lc.line, node.lc.col
        else:
            ln, cl = node.lc.key(key)
        return ln + 1, cl + 1
    except (AttributeError, KeyError, TypeError, IndexError):
        return 1, 1
