"""Turning the `fields:` tree of a mapping into closures, once, at load time.

Every target in `fields:` is one of:
- a rule (a mapping with `from:` / `value:` / `default:` ... keys)      -> one value
- a nested mapping of targets                                          -> a dict
- a list whose items are nested mappings or rules                      -> a list (a DICOM sequence);
  rule items that come out empty are dropped, list results are spliced in
- a scalar                                                             -> that literal (or template)
Problems are collected with file, line and key (never stop at the first one). At run time the
closures do only what the rule needs; anything wrong raises ProcessingError naming the HL7
path (location) and the rule's line (source).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from zoneinfo import ZoneInfo

from engine.configfile import Problem
from engine.errors import REQUIRED_FIELD_MISSING, TABLE_VALUE_NOT_FOUND, ProcessingError
from engine.mapping import paths as hp
from engine.mapping.conditions import ConditionError, parse_condition
from engine.mapping.formats import FORMATS, Format, FormatRegistry
from engine.mapping.tables import ON_MISSING, CodeTable, TableError, inline_table, load_csv_table
from engine.mapping.templates import TemplateError, compile_template, literal_text, template_paths

OMIT: Any = object()  # a rule whose `when:` is false leaves its target out
Evaluator = Callable[[Any], Any]

BASE_RULE_KEYS = ("from", "value", "default", "required", "map", "table", "on_missing", "format", "when")
_MISSING: Any = object()


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


_FALSY_EMPTY = frozenset({str, list, tuple, dict, type(None)})  # 0 and False are values, not empty
_CONTAINERS = frozenset({list, tuple, dict})


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


# Segments that belong to the message, never to an ORDER/OBSERVATION group: read them from the
# message directly (the group would only fall back to it, slower).
MESSAGE_LEVEL = frozenset(
    {"MSH", "EVN", "PID", "PD1", "PV1", "PV2", "MRG", "NK1", "GT1", "IN1", "IN2", "IN3", "AL1", "DG1"}
)


class Scope:
    """The message (or one group of it) being mapped, as the compiled rules see it.

    It offers the view's reading API to formats and conditions, and lets compiled paths skip
    segments the message does not have with one substring test instead of a lookup.
    """

    __slots__ = ("view", "msg", "text", "memo", "top_memo")

    def __init__(self, view: Any, msg: Any, text: str | None = None, top_memo: dict[str, Any] | None = None) -> None:
        self.view = view
        self.msg = msg
        self.text = text if text is not None else "\r" + msg.text
        self.memo: dict[str, Any] = {}  # path text -> value, for this group
        self.top_memo: dict[str, Any] = {} if top_memo is None else top_memo  # message-level, shared

    def get(self, path: Any) -> str:
        return self.view.get(path)

    def get_all(self, path: Any) -> list[str]:
        return self.view.get_all(path)

    def components(self, path: Any) -> list[str]:
        return self.view.components(path)

    def segments(self, name: str | None = None) -> list[Any]:
        return self.view.segments(name)

    def groups(self, kind: str) -> list[Any]:
        return self.view.groups(kind)


def location_for(path_texts: list[str], scope: Any) -> str:
    """ERR-2 location: the first path whose segment the message has (else the first path)."""
    for text in path_texts:
        try:
            if scope.segments(hp.segment_of(text)):
                return text
        except Exception:  # noqa: BLE001 - a location is best effort, never a second failure
            break
    return path_texts[0] if path_texts else ""


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
        raise ProcessingError(f"{self.target}: {text}", code, location, source=self.source)

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
            ln, cl = node.lc.item(key)
        elif key is None:
            ln, cl = node.lc.line, node.lc.col
        else:
            ln, cl = node.lc.key(key)
        return ln + 1, cl + 1
    except (AttributeError, KeyError, TypeError, IndexError):
        return 1, 1


def is_rule(node: Any) -> bool:
    """A mapping is a rule when it uses a rule key (whose value is not itself a target mapping)."""
    if not isinstance(node, dict):
        return False
    if "from" in node:  # never a target name
        return True
    for k, v in node.items():
        if k in BASE_RULE_KEYS and (k == "map" or not isinstance(v, dict)):
            return True
    return False


# ---------------------------------------------------------------- tree


def compile_fields(node: Any, ctx: CompileContext) -> Evaluator:
    """The whole `fields:` tree -> a function scope -> dict."""
    if not isinstance(node, dict) or not node:
        ctx.problems.append(
            Problem(ctx.display, *position(node, None), "fields", "fields must be a mapping of target names to rules")
        )
        return lambda scope: {}
    dicom_top = ctx.dicom and "dataset" not in node
    return _compile_object(node, "fields", ctx, dicom=dicom_top)


def _compile_object(node: dict, keypath: str, ctx: CompileContext, *, dicom: bool) -> Evaluator:
    items: list[tuple[str, Evaluator]] = []
    for key, value in node.items():
        kp = f"{keypath}.{key}"
        if not isinstance(key, str) or not key:
            ctx.problem(node, key, kp, "a target name must be text")
            continue
        if dicom:
            _check_keyword(node, key, kp, ctx)
        child_dicom = dicom or (ctx.dicom and keypath == "fields" and key == "dataset")
        ev = _compile_target(node, key, value, kp, ctx, dicom=child_dicom)
        if ev is not None:
            items.append((key, ev))
    keep_empty = ctx.settings.keep_empty
    items_t = tuple(items)

    if keep_empty:

        def build(scope: Any) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, ev in items_t:
                v = ev(scope)
                if v is not OMIT:
                    out[key] = "" if v is None else v
            return out

        return build

    def build_pruned(scope: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, ev in items_t:
            v = ev(scope)
            if v is OMIT or (not v and v.__class__ in _FALSY_EMPTY) or (v.__class__ in _CONTAINERS and is_empty(v)):
                continue
            out[key] = v
        return out

    return build_pruned


def _compile_target(
    parent: Any, key: Any, value: Any, kp: str, ctx: CompileContext, *, dicom: bool
) -> Evaluator | None:
    if is_rule(value):
        return compile_rule(value, parent, key, kp, ctx)
    if isinstance(value, dict):
        if not value:
            ctx.problem(parent, key, kp, "empty mapping: give a rule (from:, value:) or nested targets")
            return None
        return _compile_object(value, kp, ctx, dicom=dicom)
    if isinstance(value, list):
        return _compile_list(value, kp, ctx, dicom=dicom)
    return _compile_literal(value, parent, key, kp, ctx)


def _compile_list(node: list, kp: str, ctx: CompileContext, *, dicom: bool) -> Evaluator:
    parts: list[tuple[bool, Evaluator]] = []  # (is_object, evaluator)
    for i, item in enumerate(node):
        ikp = f"{kp}[{i}]"
        if is_rule(item):
            ev = compile_rule(item, node, i, ikp, ctx)
            if ev is not None:
                parts.append((False, ev))
        elif isinstance(item, dict):
            parts.append((True, _compile_object(item, ikp, ctx, dicom=dicom)))
        elif isinstance(item, list):
            ctx.problem(node, i, ikp, "a list inside a list is not supported")
        else:
            ev = _compile_literal(item, node, i, ikp, ctx)
            if ev is not None:
                parts.append((False, ev))
    parts_t = tuple(parts)

    def build(scope: Any) -> list[Any]:
        out: list[Any] = []
        for is_object, ev in parts_t:
            v = ev(scope)
            if is_object:
                out.append(v)
            elif v is OMIT or is_empty(v):
                continue
            elif isinstance(v, list):
                out.extend(x for x in v if not is_empty(x))
            else:
                out.append(v)
        return out

    return build


def _compile_literal(value: Any, parent: Any, key: Any, kp: str, ctx: CompileContext) -> Evaluator | None:
    if value is None:
        return lambda scope: ""
    if isinstance(value, str):
        try:
            render = compile_template(value)
        except TemplateError as exc:
            ctx.problem(parent, key, kp, str(exc))
            return None
        if render is not None:
            return render
        text = literal_text(value)
        return lambda scope: text
    if isinstance(value, bool | int | float):
        return lambda scope: value
    ctx.problem(parent, key, kp, "expected a rule, a nested mapping, a list or a literal")
    return None


def _check_keyword(node: Any, key: str, kp: str, ctx: CompileContext) -> None:
    from pydicom.datadict import keyword_dict

    if key not in keyword_dict:
        near = difflib.get_close_matches(key, keyword_dict.keys(), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        ctx.problem(node, key, kp, f"not a DICOM keyword{hint}")


# ---------------------------------------------------------------- rules


def _paths_of(value: Any) -> list[Any] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def compile_rule(node: dict, parent: Any, key: Any, kp: str, ctx: CompileContext) -> Evaluator | None:
    """One rule -> a closure scope -> value (or OMIT). Returns None (and records problems) if bad."""
    bad = len(ctx.problems)
    line, _ = position(parent, key)
    source = f"{ctx.display}:{line}"
    parts = kp.split(".")
    while len(parts) > 1 and parts[-1] == "default":  # a fallback rule speaks for its target
        parts.pop()
    target = parts[-1]

    # formats first: they decide which extra keys the rule may carry
    formats: list[Format] = []
    fmt_node = node.get("format")
    if "format" in node:
        names = _paths_of(fmt_node)
        if names is None:
            ctx.problem(node, "format", f"{kp}.format", "format must be a name or a list of names")
        else:
            for name in names:
                f = ctx.formats.get(name)
                if f is None:
                    near = difflib.get_close_matches(name, ctx.formats.names(), n=1)
                    hint = f" (did you mean {near[0]}?)" if near else ""
                    ctx.problem(
                        node,
                        "format",
                        f"{kp}.format",
                        f"unknown format {name!r}{hint}; known: {', '.join(ctx.formats.names())}",
                    )
                else:
                    formats.append(f)
    allowed = set(BASE_RULE_KEYS)
    for f in formats:
        allowed |= f.options
    for k in node:
        if k not in allowed:
            near = difflib.get_close_matches(str(k), sorted(allowed), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            ctx.problem(node, k, f"{kp}.{k}", f"unknown key in rule{hint}")

    # where the value comes from
    getter: Evaluator | None = None
    path_texts: list[str] = []
    wants_components = bool(formats) and formats[0].components
    for i, f in enumerate(formats):
        if f.components and i > 0:
            ctx.problem(
                node, "format", f"{kp}.format", f"format {f.name} reads HL7 components: it must come first in the list"
            )
        for s in f.needs_settings:
            if not getattr(ctx.settings, s):
                ctx.problem(node, "format", f"{kp}.format", f"format {f.name} needs settings.{s}")
    if "from" in node and "value" in node:
        ctx.problem(node, "value", f"{kp}.value", "use either from: or value:, not both")
    if "from" in node:
        texts = _paths_of(node["from"])
        if texts is None:
            ctx.problem(node, "from", f"{kp}.from", "from must be an HL7 path or a list of paths")
        else:
            getter, path_texts = _compile_from(texts, node, kp, ctx, wants_components)
    elif "value" in node:
        if wants_components:
            ctx.problem(
                node,
                "format",
                f"{kp}.format",
                f"format {formats[0].name} reads the components of an HL7 field: use from:",
            )
        getter = _compile_literal(node["value"], node, "value", f"{kp}.value", ctx)
        if isinstance(node["value"], str):
            try:
                path_texts = template_paths(node["value"])
            except TemplateError:
                pass
    elif "default" not in node:
        ctx.problem(parent, key, kp, "a rule needs from:, value: or default:")

    default: Evaluator | None = None
    if "default" in node:
        d = node["default"]
        if is_rule(d):  # a fallback rule: its own from/map/default
            default = compile_rule(d, node, "default", f"{kp}.default", ctx)
        elif isinstance(d, dict | list):
            ctx.problem(node, "default", f"{kp}.default", "default must be a literal, a template or a rule")
        else:
            default = _compile_literal(d, node, "default", f"{kp}.default", ctx)

    required = node.get("required", False)
    if not isinstance(required, bool):
        ctx.problem(node, "required", f"{kp}.required", "required must be true or false")
        required = False

    tables = _compile_tables(node, kp, ctx)
    on_missing = node.get("on_missing")
    if on_missing is not None and on_missing not in ON_MISSING:
        ctx.problem(node, "on_missing", f"{kp}.on_missing", f"on_missing must be one of {', '.join(ON_MISSING)}")
    if on_missing is not None and "map" not in node and "table" not in node:
        ctx.problem(node, "on_missing", f"{kp}.on_missing", "on_missing needs map: or table:")

    when = None
    if "when" in node:
        try:
            when, _ = parse_condition(node["when"], hp.compile_path, hp.is_list)
        except ConditionError as exc:
            ctx.problem(node, "when", f"{kp}.when", str(exc))

    options: dict[str, list[tuple[str, Any]]] = {}
    for f in formats:
        for opt in sorted(f.options):
            if opt in node:
                texts = _paths_of(node[opt])
                if texts is None:
                    ctx.problem(node, opt, f"{kp}.{opt}", f"{opt} must be an HL7 path or a list of paths")
                    continue
                compiled = []
                for t in texts:
                    try:
                        compiled.append((t, hp.compile_path(t)))
                    except ValueError as exc:
                        ctx.problem(node, opt, f"{kp}.{opt}", f"bad path {t!r}: {exc}")
                options[opt] = compiled
        if f.name == "study_uid" and ctx.settings.study_uid_policy == "accession_based" and "accession" not in node:
            ctx.problem(
                node,
                "format",
                f"{kp}.format",
                "study_uid with study_uid_policy accession_based "
                "needs accession: (where the accession number is, e.g. [IPC-1, OBR-18])",
            )

    if len(ctx.problems) > bad:
        return None
    if getter is None:
        getter = lambda scope: ""  # noqa: E731 - only default: given
    rc = RuleContext(target, source, path_texts, ctx.settings, options)
    return _build_rule(rc, getter, formats, tables, on_missing, default, required, when)


def _compile_from(
    texts: list[str], node: Any, kp: str, ctx: CompileContext, components: bool
) -> tuple[Evaluator | None, list[str]]:
    getters: list[Evaluator] = []
    for t in texts:
        try:
            path = hp.compile_path(t)
        except ValueError as exc:
            ctx.problem(node, "from", f"{kp}.from", f"bad path {t!r}: {exc}")
            continue
        many = hp.is_list(t)
        if components and many and t.count("[*]") > 1:
            ctx.problem(node, "from", f"{kp}.from", f"{t}: a components format takes at most one [*]")
            continue
        getters.append(_getter(t, path, many, components))
    if len(getters) != len(texts):
        return None, texts
    if len(getters) == 1:
        return getters[0], texts
    if not components and not any(hp.is_list(t) for t in texts):
        return _first_text(texts), texts
    getters_t = tuple(getters)

    def first(scope: Any) -> Any:
        v: Any = ""
        for g in getters_t:
            v = g(scope)
            if not is_empty(v):
                return v
        return v

    return first, texts


def _first_text(texts: list[str]) -> Evaluator:
    """First non-empty of several plain paths, in one closure (the hot case)."""
    specs = tuple((t, *_path_spec(t)) for t in texts)

    def first(scope: Scope) -> str:
        for key, marker, top, path in specs:
            memo = scope.top_memo if top else scope.memo
            v = memo.get(key)
            if v is None:
                if marker and marker not in scope.text:
                    v = ""
                else:
                    v = (scope.msg if top else scope.view).get(path)
                memo[key] = v
            if v:
                return v
        return ""

    return first


def _path_spec(text: str) -> tuple[str, bool, Any]:
    seg = hp.segment_of(text)
    return ("" if seg == "MSH" else "\r" + seg), seg in MESSAGE_LEVEL, hp.compile_path(text)


class Parts(tuple):  # noqa: SLOT001 - instances carry where they came from
    """Decoded components of one value; `sub(i)` reads the subcomponents of component i."""

    def sub(self, i: int) -> list[str]:
        view, text = self.view, self.text  # type: ignore[attr-defined]
        if text.count(".") >= 1 and hp.has_component(text):
            return [self[i]] if i < len(self) else []  # already subcomponents
        return view.components(hp.compile_path(f"{text}.{i + 1}"))


def _parts(c: list[str], view: Any, text: str) -> Any:
    if not any(c):
        return ""
    p = Parts(c)
    p.view = view  # type: ignore[attr-defined]
    p.text = text  # type: ignore[attr-defined]
    return p


def _getter(text: str, path: Any, many: bool, components: bool) -> Evaluator:
    seg = hp.segment_of(text)
    marker = "" if seg == "MSH" else "\r" + seg  # MSH is always there
    top = seg in MESSAGE_LEVEL
    if not components:
        if many:

            def get_all(scope: Scope) -> Any:
                if marker and marker not in scope.text:
                    return []
                return (scope.msg if top else scope.view).get_all(path)

            return get_all

        def get(scope: Scope) -> Any:
            memo = scope.top_memo if top else scope.memo
            v = memo.get(text)
            if v is None:
                if marker and marker not in scope.text:
                    v = ""
                else:
                    v = (scope.msg if top else scope.view).get(path)
                memo[text] = v
            return v

        return get
    if not many:

        def comps(scope: Scope) -> Any:
            if marker and marker not in scope.text:
                return ""
            view = scope.msg if top else scope.view
            return _parts(view.components(path), view, text)  # a tuple: one value (a list: repetitions)

        return comps

    def comps_each(scope: Scope) -> Any:
        if marker and marker not in scope.text:
            return []
        view = scope.msg if top else scope.view
        n = len(view.get_all(path))
        out = []
        for i in range(1, n + 1):
            rep = hp.repetition_path(text, i)
            out.append(_parts(view.components(hp.compile_path(rep)), view, rep))
        return out

    return comps_each


def _compile_tables(node: Any, kp: str, ctx: CompileContext) -> list[CodeTable]:
    """`map:` (inline codes or one file) or `table:` (a file or a list applied in turn)."""
    if "map" in node and "table" in node:
        ctx.problem(node, "table", f"{kp}.table", "use either map: or table:, not both")
        return []
    if "map" in node:
        m = node["map"]
        if isinstance(m, dict):
            if not m:
                ctx.problem(node, "map", f"{kp}.map", "map is empty")
                return []
            return [inline_table(dict(m))]
        if isinstance(m, str):
            t = _table_file(m, node, "map", kp, ctx)
            return [t] if t else []
        ctx.problem(node, "map", f"{kp}.map", "map must be code: value pairs or a table file name")
        return []
    if "table" in node:
        names = _paths_of(node["table"])
        if names is None:
            ctx.problem(node, "table", f"{kp}.table", "table must be a file name like priority.csv (or a list)")
            return []
        found = [_table_file(n, node, "table", kp, ctx) for n in names]
        return [t for t in found if t is not None]
    return []


def _table_file(name: str, node: Any, key: str, kp: str, ctx: CompileContext) -> CodeTable | None:
    if name in ctx.tables:
        return ctx.tables[name]
    if ctx.tables_dir is None:
        ctx.problem(node, key, f"{kp}.{key}", f"no tables folder to find {name} in")
        return None
    path = ctx.tables_dir / name
    if not path.is_file():
        ctx.problem(node, key, f"{kp}.{key}", f"table file {name} not found in {ctx.tables_dir}")
        return None
    try:
        table = load_csv_table(path)
    except TableError as exc:
        ctx.problem(node, key, f"{kp}.{key}", str(exc))
        return None
    ctx.tables[name] = table
    return table


def _build_rule(
    rc: RuleContext,
    get: Evaluator,
    formats: list[Format],
    tables: list[CodeTable],
    on_missing: str | None,
    default: Evaluator | None,
    required: bool,
    when: Callable[[Any], bool] | None,
) -> Evaluator:
    if not formats and not tables and default is None and not required and when is None:
        return get  # the common case: a plain copy

    funcs = tuple(f.func for f in formats)
    single = funcs[0] if len(funcs) == 1 else None

    def fmt(v: Any, scope: Any) -> Any:
        try:
            if single is not None and v.__class__ is not list:
                return single(v, rc, scope)
            for func in funcs:
                if isinstance(v, list):
                    v = [func(x, rc, scope) for x in v]
                else:
                    v = func(v, rc, scope)
        except ProcessingError as exc:
            if not exc.location:
                exc.location = _value_location(rc, scope)
            raise
        return v

    lookups = tuple(_lookup(rc, t, on_missing or ("default" if t.has_default else "error")) for t in tables)
    fallback = default is not None or required

    def rule(scope: Any) -> Any:
        if when is not None and not when(scope):
            return OMIT
        v = get(scope)
        if funcs:
            v = fmt(v, scope)
        for lookup in lookups:
            if (not v and v.__class__ in _FALSY_EMPTY) or (v.__class__ in _CONTAINERS and is_empty(v)):
                break
            v = [lookup(x, scope) for x in v] if v.__class__ is list else lookup(v, scope)
        if fallback and ((not v and v.__class__ in _FALSY_EMPTY) or (v.__class__ in _CONTAINERS and is_empty(v))):
            if default is not None:
                v = default(scope)
                if v is OMIT:
                    v = ""
            if required and ((not v and v.__class__ in _FALSY_EMPTY) or (v.__class__ in _CONTAINERS and is_empty(v))):
                rc.fail(REQUIRED_FIELD_MISSING, "required field missing", location=location_for(rc.paths, scope))
        return v

    return rule


def _value_location(rc: RuleContext, scope: Any) -> str:
    """The path that supplied the value (first non-empty), for an error in a format."""
    for text in rc.paths:
        try:
            if scope.get(hp.compile_path(text)):
                return text
        except Exception:  # noqa: BLE001 - best effort
            break
    return location_for(rc.paths, scope)


def _lookup(rc: RuleContext, table: CodeTable, on_missing: str) -> Callable[[Any, Any], Any]:
    entries = table.entries
    default = table.default if table.default is not None else ""

    def lookup(v: Any, scope: Any) -> Any:
        if is_empty(v):
            return v
        r = entries.get(v if isinstance(v, str) else str(v), _MISSING)
        if r is not _MISSING:
            return r
        if on_missing == "keep":
            return v
        if on_missing == "default":
            return default
        rc.fail(TABLE_VALUE_NOT_FOUND, f"code not in table {table.name}", location=_value_location(rc, scope))

    return lookup
