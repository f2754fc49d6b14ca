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
from typing import Any

from engine.configfile import Problem
from engine.errors import ProcessingError
from engine.mapping import paths as hp
from engine.mapping.conditions import ConditionError, parse_condition
from engine.mapping.context import (
    CONTAINERS,
    FALSY_EMPTY,
    OMIT,
    CompileContext,
    Evaluator,
    RuleContext,
    Settings,
    is_empty,
    location_for,
    position,
)
from engine.mapping.reading import MESSAGE_LEVEL, Parts, Scope, _parts
from engine.mapping.rules import BASE_RULE_KEYS, _value_location, compile_literal, compile_rule, is_rule

__all__ = [
    "BASE_RULE_KEYS",
    "MESSAGE_LEVEL",
    "OMIT",
    "CompileContext",
    "Evaluator",
    "Parts",
    "RuleContext",
    "Scope",
    "Settings",
    "compile_fields",
    "compile_rule",
    "is_empty",
    "is_rule",
    "location_for",
    "position",
]


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
    return _generate_object(items, keep_empty=ctx.settings.keep_empty)


def _read_lines(plain: tuple, ns: dict[str, Any], tag: str, indent: str) -> list[str]:
    """Code that sets v to the first non-empty of plain reads ((marker, top, path), ...)."""
    lines = [f"{indent}v = ''"]
    for j, (marker, top, path) in enumerate(plain):
        p = f"P{tag}_{j}"
        ns[p] = path
        cond = [] if j == 0 else ["not v"]
        if marker:
            m = f"M{tag}_{j}"
            ns[m] = marker
            cond.append(f"{m} in text")  # the message has no such segment: skip the read
        read = f"v = {'mget' if top else 'vget'}({p})"
        lines.append(f"{indent}if {' and '.join(cond)}: {read}" if cond else f"{indent}{read}")
    return lines


def _generate_object(items: list[tuple[str, Evaluator]], *, keep_empty: bool) -> Evaluator:
    """One function for one object of targets, generated once: plain reads (and plain reads with a
    required check or a single format) are inlined, every other target calls its closure. It does
    what the loop `for key, ev in items: v = ev(scope); ...` did, minus a call or three per target.
    """
    ns: dict[str, Any] = {"OMIT": OMIT, "FALSY_EMPTY": FALSY_EMPTY, "CONTAINERS": CONTAINERS, "is_empty": is_empty}
    ns["ProcessingError"] = ProcessingError
    ns["value_location"] = _value_location
    ns["parts"] = _parts
    body: list[str] = []
    uses_view = False
    for n, (key, ev) in enumerate(items):
        k = f"K{n}"
        ns[k] = key
        plain = getattr(ev, "plain", None)
        required = getattr(ev, "plain_required", None)
        fmt = getattr(ev, "plain_format", None)
        cfmt = getattr(ev, "components_format", None)
        if plain is not None or required is not None:  # a str, never OMIT or None
            body += _read_lines(plain or required, ns, str(n), "    ")
            if required is not None:
                ns[f"E{n}"] = ev
                body.append(f"    if not v: v = E{n}(scope)")
            body.append(f"    out[{k}] = v" if keep_empty else f"    if v: out[{k}] = v")
            uses_view = uses_view or any(not top for _m, top, _p in plain or required)
            continue
        if fmt is not None or cfmt is not None:
            if fmt is not None:
                fplain, func, rc = fmt
                body += _read_lines(fplain, ns, str(n), "    ")
                uses_view = uses_view or any(not top for _m, top, _p in fplain)
            else:
                (marker, top, path, text), func, rc = cfmt
                ns[f"P{n}"], ns[f"T{n}"], ns[f"M{n}"] = path, text, marker
                view = "mview" if top else "gview"
                read = f"parts({view}.components(P{n}), {view}, T{n})"
                body.append(f"    v = {read} if M{n} in text else ''" if marker else f"    v = {read}")
            ns[f"F{n}"], ns[f"RC{n}"] = func, rc
            body += [
                "    try:",
                f"        v = F{n}(v, RC{n}, scope)",
                "    except ProcessingError as exc:",
                "        if not exc.location:",
                f"            exc.location = value_location(RC{n}, scope)",
                "        raise",
            ]
        else:
            ns[f"E{n}"] = ev
            body.append(f"    v = E{n}(scope)")
        if keep_empty:
            body.append(f"    if v is not OMIT: out[{k}] = '' if v is None else v")
        else:
            body.append(
                "    if not (v is OMIT or (not v and v.__class__ in FALSY_EMPTY)"
                f" or (v.__class__ in CONTAINERS and is_empty(v))): out[{k}] = v"
            )
    head = ["def build(scope):", "    text = scope.text", "    mview = scope.msg", "    mget = mview.get"]
    head.append("    gview = scope.view")
    if uses_view:
        head.append("    vget = gview.get")
    src = "\n".join([*head, "    out = {}", *body, "    return out", ""])
    exec(compile(src, "<mapping object>", "exec"), ns)  # noqa: S102 - our own generated code
    return ns["build"]


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
    return compile_literal(value, parent, key, kp, ctx)


def _compile_list(node: list, kp: str, ctx: CompileContext, *, dicom: bool) -> Evaluator:
    parts: list[tuple[bool, Evaluator]] = []  # (is_object, evaluator)
    for i, item in enumerate(node):
        ikp = f"{kp}[{i}]"
        if isinstance(item, dict) and "for_each" in item:
            ev = _compile_repeat(item, node, i, ikp, ctx, dicom=dicom)
            if ev is not None:
                parts.append((False, ev))
        elif is_rule(item):
            ev = compile_rule(item, node, i, ikp, ctx)
            if ev is not None:
                parts.append((False, ev))
        elif isinstance(item, dict):
            parts.append((True, _compile_object(item, ikp, ctx, dicom=dicom)))
        elif isinstance(item, list):
            ctx.problem(node, i, ikp, "a list inside a list is not supported")
        else:
            ev = compile_literal(item, node, i, ikp, ctx)
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


def _compile_repeat(item: dict, parent: list, i: int, kp: str, ctx: CompileContext, *, dicom: bool) -> Evaluator | None:
    """`- {for_each: OBSERVATION, when: ..., fields: {...}}`: one list item per group in the scope."""
    bad = len(ctx.problems)
    for key in item:
        if key not in ("for_each", "when", "fields"):
            ctx.problem(item, key, f"{kp}.{key}", "unknown key (a repeated item has for_each, when, fields)")
    kind = item.get("for_each")
    if kind not in ("ORDER", "OBSERVATION"):
        ctx.problem(item, "for_each", f"{kp}.for_each", "for_each must be ORDER or OBSERVATION")
    when = None
    if "when" in item:
        try:
            when, _ = parse_condition(item["when"], hp.compile_path, hp.is_list)
        except ConditionError as exc:
            ctx.problem(item, "when", f"{kp}.when", str(exc))
    fields = item.get("fields")
    if not isinstance(fields, dict) or not fields:
        ctx.problem(parent, i, kp, "a repeated item needs fields: (the targets of each item)")
        return None
    build = _compile_object(fields, f"{kp}.fields", ctx, dicom=dicom)
    if len(ctx.problems) > bad:
        return None

    def repeat(scope: Scope) -> list[Any]:
        out = []
        for group in scope.view.groups(kind):
            inner = Scope(group, scope.msg, scope.text, scope.top_memo)
            if when is None or when(inner):
                out.append(build(inner))
        return out

    return repeat


def _check_keyword(node: Any, key: str, kp: str, ctx: CompileContext) -> None:
    from pydicom.datadict import keyword_dict

    if key not in keyword_dict:
        near = difflib.get_close_matches(key, keyword_dict.keys(), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        ctx.problem(node, key, kp, f"not a DICOM keyword{hint}")


# ---------------------------------------------------------------- rules
