"""One rule (`{from:, value:, default:, required:, map:/table:, on_missing:, on_invalid:, format:,
when:}`) compiled into a RulePlan; problems are collected with their line, never raised one by one."""

from __future__ import annotations

import difflib
from typing import Any

from engine.mapping import paths as hp
from engine.mapping.closures import rule_closure
from engine.mapping.conditions import ConditionError, parse_condition
from engine.mapping.context import (
    ON_INVALID,
    CompileContext,
    Evaluator,
    RuleContext,
    is_empty,
    position,
)
from engine.mapping.formats import Format
from engine.mapping.plan import RulePlan, TableStep
from engine.mapping.reading import Read, first_text, getter, read_of
from engine.mapping.tables import ON_MISSING, CodeTable, TableError, inline_table, load_csv_table
from engine.mapping.templates import TemplateError, compile_template, literal_text, template_paths

BASE_RULE_KEYS = (
    "from",
    "value",
    "default",
    "required",
    "map",
    "table",
    "on_missing",
    "on_invalid",
    "format",
    "when",
)


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


def _paths_of(value: Any) -> list[Any] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def compile_literal(value: Any, parent: Any, key: Any, kp: str, ctx: CompileContext) -> Evaluator | None:
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


def compile_when(node: dict, kp: str, ctx: CompileContext) -> Any:
    """The node's `when:` condition, or None; a bad one is a problem at its line."""
    if "when" not in node:
        return None
    try:
        return parse_condition(node["when"], hp.compile_path, hp.is_list)[0]
    except ConditionError as exc:
        ctx.problem(node, "when", f"{kp}.when", str(exc))
        return None


def compile_rule(
    node: dict, parent: Any, key: Any, kp: str, ctx: CompileContext, *, on_invalid: str | None = None
) -> RulePlan | None:
    """One rule -> its plan (closures.rule_closure makes the closure). Returns None (and records problems) if bad.

    `on_invalid` is the target's when this is its `default:` rule (a fallback speaks for its target).
    """
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
    get: Evaluator | None = None
    chain: tuple[tuple[str, Evaluator], ...] = ()
    reads: tuple[Read, ...] = ()
    component_reads: tuple[Read, ...] = ()
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
            get, reads, chain = _compile_from(texts, node, kp, ctx, wants_components)
            path_texts = texts
            if wants_components:
                reads, component_reads = (), reads
    elif "value" in node:
        if wants_components:
            ctx.problem(
                node,
                "format",
                f"{kp}.format",
                f"format {formats[0].name} reads the components of an HL7 field: use from:",
            )
        get = compile_literal(node["value"], node, "value", f"{kp}.value", ctx)
        if isinstance(node["value"], str):
            try:
                path_texts = template_paths(node["value"])
            except TemplateError:
                pass
    elif "default" not in node:
        ctx.problem(parent, key, kp, "a rule needs from:, value: or default:")

    required = node.get("required", False)
    if not isinstance(required, bool):
        ctx.problem(node, "required", f"{kp}.required", "required must be true or false")
        required = False

    policy = node.get("on_invalid", on_invalid or ("reject" if required else "drop"))
    if policy not in ON_INVALID:
        ctx.problem(node, "on_invalid", f"{kp}.on_invalid", f"on_invalid must be one of {', '.join(ON_INVALID)}")
        policy = "reject"

    default: Evaluator | None = None
    if "default" in node:
        d = node["default"]
        if is_rule(d):  # a fallback rule: its own from/map/default
            fallback = compile_rule(d, node, "default", f"{kp}.default", ctx, on_invalid=policy)
            default = rule_closure(fallback) if fallback is not None else None
        elif isinstance(d, dict | list):
            ctx.problem(node, "default", f"{kp}.default", "default must be a literal, a template or a rule")
        else:
            default = compile_literal(d, node, "default", f"{kp}.default", ctx)

    tables = _compile_tables(node, kp, ctx)
    on_missing = node.get("on_missing")
    if on_missing is not None and on_missing not in ON_MISSING:
        ctx.problem(node, "on_missing", f"{kp}.on_missing", f"on_missing must be one of {', '.join(ON_MISSING)}")
    if on_missing is not None and "map" not in node and "table" not in node:
        ctx.problem(node, "on_missing", f"{kp}.on_missing", "on_missing needs map: or table:")

    when = compile_when(node, kp, ctx)

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
    if get is None:
        get = lambda scope: ""  # noqa: E731 - only default: given
    rc = RuleContext(target, source, path_texts, ctx.settings, options)
    steps = tuple(TableStep(t, on_missing or ("default" if t.has_default else "error")) for t in tables)
    return RulePlan(rc, get, reads, component_reads, tuple(formats), steps, default, required, when, policy, chain)


def _compile_from(
    texts: list[str], node: Any, kp: str, ctx: CompileContext, components: bool
) -> tuple[Evaluator | None, tuple[Read, ...], tuple[tuple[str, Evaluator], ...]]:
    """The getter of `from:`, its reads when it is nothing but reads of single fields, and the
    getter of each path (the chain)."""
    getters: list[Evaluator] = []
    reads: list[Read] = []
    for t in texts:
        try:
            read = read_of(t)
        except ValueError as exc:
            ctx.problem(node, "from", f"{kp}.from", f"bad path {t!r}: {exc}")
            continue
        many = hp.is_list(t)
        if components and many and t.count("[*]") > 1:
            ctx.problem(node, "from", f"{kp}.from", f"{t}: a components format takes at most one [*]")
            continue
        getters.append(getter(read, many, components))
        if not many:
            reads.append(read)
    if len(getters) != len(texts):
        return None, (), ()
    plain = tuple(reads) if len(reads) == len(texts) else ()
    chain = tuple(zip(texts, getters, strict=True))
    if len(getters) == 1:
        return getters[0], plain, chain
    if not components and plain:
        return first_text(plain), plain, chain
    getters_t = tuple(getters)

    def first(scope: Any) -> Any:
        v: Any = ""
        for g in getters_t:
            v = g(scope)
            if not is_empty(v):
                return v
        return v

    return first, plain, chain


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
