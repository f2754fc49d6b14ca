"""Turning the `fields:` tree of a mapping into closures, once, at load time.

Every target in `fields:` is one of:
- a rule (a mapping with `from:` / `value:` / `default:` ... keys)      -> one value
- a nested mapping of targets                                          -> a dict
- a list whose items are nested mappings or rules                      -> a list (a DICOM sequence);
  rule items that come out empty are dropped, list results are spliced in
- a scalar                                                             -> that literal (or template)
Problems are collected with file, line and key (never stop at the first one). A rule compiles to
a RulePlan (engine/mapping/plan.py); each object of targets becomes one generated function that
inlines the plain shapes of those plans and calls `rule_closure(plan)` for the rest. At run time
the code does only what the rule needs; anything wrong raises ProcessingError naming the HL7 path
(location) and the rule's line (source).
"""

from __future__ import annotations

import difflib
from typing import Any

from engine.configfile import Problem
from engine.errors import ProcessingError
from engine.mapping.closures import empty_closure, recover_closure, rule_closure, table_lookup
from engine.mapping.context import CONTAINERS, FALSY_EMPTY, OMIT, CompileContext, Evaluator, is_empty, position
from engine.mapping.plan import RulePlan
from engine.mapping.reading import Read, Scope, parts
from engine.mapping.rules import compile_literal, compile_rule, compile_when, is_rule

__all__ = ["compile_fields"]


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
    items: list[tuple[str, RulePlan | Evaluator]] = []
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


def _read_lines(reads: tuple[Read, ...], ns: dict[str, Any], tag: str) -> list[str]:
    """Code that sets v to the first non-empty of plain reads."""
    lines = ["v = ''"]
    for j, r in enumerate(reads):
        p = f"P{tag}_{j}"
        ns[p] = r.path
        cond = [] if j == 0 else ["not v"]
        if r.marker:
            m = f"M{tag}_{j}"
            ns[m] = r.marker
            cond.append(f"{m} in text")  # the message has no such segment: skip the read
        read = f"v = {'mget' if r.top else 'vget'}({p})"
        lines.append(f"if {' and '.join(cond)}: {read}" if cond else read)
    return lines


def _components_lines(reads: tuple[Read, ...], ns: dict[str, Any], tag: str) -> list[str]:
    """Code that sets v to the first non-empty components (a Parts, else "") of several fields."""
    lines = ["v = ''"]
    for j, r in enumerate(reads):
        p, t = f"P{tag}_{j}", f"T{tag}_{j}"
        ns[p], ns[t] = r.path, r.text
        view = "mview" if r.top else "gview"
        cond = [] if j == 0 else ["not v"]  # "" or a Parts with a non-empty component
        if r.marker:
            ns[f"M{tag}_{j}"] = r.marker
            cond.append(f"M{tag}_{j} in text")
        read = f"v = parts({view}.components({p}), {view}, {t})"
        lines.append(f"if {' and '.join(cond)}: {read}" if cond else read)
    return lines


EMPTY_TEST = "(not v and v.__class__ in FALSY_EMPTY) or (v.__class__ in CONTAINERS and is_empty(v))"


def _value_lines(target: RulePlan | Evaluator, ns: dict[str, Any], tag: str) -> tuple[list[str], bool]:
    """Code that sets v to the target's value; True when v is then surely a str (never OMIT/None).

    A rule whose plan is a plain read (alone, then default/required, one table or one format)
    is inlined; anything else calls its closure.
    """
    if not isinstance(target, RulePlan):
        ns[f"E{tag}"] = target
        return [f"v = E{tag}(scope)"], False
    plan = target
    single = plan.single_format
    inline = plan.when is None and not (plan.formats and single is None) and len(plan.tables) <= 1
    if plan.tables and (plan.formats or plan.has_fallback):
        inline = False
    if not plan.reads and not (plan.component_reads and single is not None):
        inline = False
    if not inline:
        ns[f"E{tag}"] = rule_closure(plan)
        return [f"v = E{tag}(scope)"], False
    if plan.tables:  # one table, nothing else: an empty read stays empty
        ns[f"L{tag}"], ns[f"R{tag}"] = table_lookup(plan.rule, plan.tables[0]), recover_closure(plan)
        lines = _read_lines(plan.reads, ns, tag)
        lines += [
            "if v:",
            f"    try: v = L{tag}(v, scope)",
            f"    except ProcessingError as exc: v = R{tag}(exc, scope)",  # next field of the chain, or on_invalid
        ]
        return lines, False
    if single is None:  # a copy, then default/required when it came back empty
        lines = _read_lines(plan.reads, ns, tag)
        if not plan.has_fallback:
            return lines, True
        ns[f"FIN{tag}"] = empty_closure(plan)
        return [*lines, f"if not v: v = FIN{tag}(scope)"], False
    lines = _read_lines(plan.reads, ns, tag) if plan.reads else _components_lines(plan.component_reads, ns, tag)
    ns[f"F{tag}"], ns[f"RC{tag}"], ns[f"R{tag}"] = single, plan.rule, recover_closure(plan)
    lines += [
        "try:",
        f"    v = F{tag}(v, RC{tag}, scope)",
        "except ProcessingError as exc:",
        f"    v = R{tag}(exc, scope)",  # the next field of the chain, or on_invalid
    ]
    if plan.has_fallback:  # default:/required: act on an empty result only
        ns[f"FIN{tag}"] = empty_closure(plan)
        lines.append(f"if {EMPTY_TEST}: v = FIN{tag}(scope)")
    return lines, False


def _namespace() -> dict[str, Any]:
    return {
        "OMIT": OMIT,
        "FALSY_EMPTY": FALSY_EMPTY,
        "CONTAINERS": CONTAINERS,
        "is_empty": is_empty,
        "ProcessingError": ProcessingError,
        "parts": parts,
    }


def _define(body: list[str], ns: dict[str, Any], what: str) -> Evaluator:
    head = [
        "def build(scope):",
        "    text = scope.text",
        "    mview = scope.msg",
        "    mget = mview.get",
        "    gview = scope.view",
        "    vget = gview.get",
    ]
    src = "\n".join([*head, *body, ""])
    exec(compile(src, f"<mapping {what}>", "exec"), ns)  # noqa: S102 - our own generated code
    return ns["build"]


def _generate_object(items: list[tuple[str, RulePlan | Evaluator]], *, keep_empty: bool) -> Evaluator:
    """One function for one object of targets, generated once: plain reads (alone, with a
    required check or default, a table or a single format) are inlined, every other target calls
    its closure. It does what `for key, ev in items: v = ev(scope); ...` did, minus a few calls
    per target.
    """
    ns = _namespace()
    body = ["    out = {}"]
    for n, (key, ev) in enumerate(items):
        ns[f"K{n}"] = key
        lines, is_str = _value_lines(ev, ns, str(n))
        body += ["    " + line for line in lines]
        if is_str:
            body.append(f"    out[K{n}] = v" if keep_empty else f"    if v: out[K{n}] = v")
        elif keep_empty:
            body.append(f"    if v is not OMIT: out[K{n}] = '' if v is None else v")
        else:
            body.append(
                "    if not (v is OMIT or (not v and v.__class__ in FALSY_EMPTY)"
                f" or (v.__class__ in CONTAINERS and is_empty(v))): out[K{n}] = v"
            )
    return _define([*body, "    return out"], ns, "object")


def _generate_list(items: list[tuple[bool, RulePlan | Evaluator]]) -> Evaluator:
    """A list's items, generated like an object's targets (empty rule results dropped, lists spliced)."""
    ns = _namespace()
    body = ["    out = []"]
    for n, (is_object, ev) in enumerate(items):
        if is_object:
            ns[f"E{n}"] = ev
            body.append(f"    out.append(E{n}(scope))")
            continue
        lines, _ = _value_lines(ev, ns, str(n))
        body += ["    " + line for line in lines]
        body += [
            "    if v is OMIT or is_empty(v): pass",
            "    elif isinstance(v, list): out.extend(x for x in v if not is_empty(x))",
            "    else: out.append(v)",
        ]
    return _define([*body, "    return out"], ns, "list")


def _compile_target(
    parent: Any, key: Any, value: Any, kp: str, ctx: CompileContext, *, dicom: bool
) -> RulePlan | Evaluator | None:
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
    items: list[tuple[bool, RulePlan | Evaluator]] = []  # (is_object, plan or evaluator)
    for i, item in enumerate(node):
        ikp = f"{kp}[{i}]"
        if isinstance(item, dict) and "for_each" in item:
            ev = _compile_repeat(item, node, i, ikp, ctx, dicom=dicom)
            if ev is not None:
                items.append((False, ev))
        elif is_rule(item):
            plan = compile_rule(item, node, i, ikp, ctx)
            if plan is not None:
                items.append((False, plan))
        elif isinstance(item, dict):
            items.append((True, _compile_object(item, ikp, ctx, dicom=dicom)))
        elif isinstance(item, list):
            ctx.problem(node, i, ikp, "a list inside a list is not supported")
        else:
            ev = compile_literal(item, node, i, ikp, ctx)
            if ev is not None:
                items.append((False, ev))
    return _generate_list(items)


def _compile_repeat(item: dict, parent: list, i: int, kp: str, ctx: CompileContext, *, dicom: bool) -> Evaluator | None:
    """`- {for_each: OBSERVATION, when: ..., fields: {...}}`: one list item per group in the scope."""
    bad = len(ctx.problems)
    for key in item:
        if key not in ("for_each", "when", "fields"):
            ctx.problem(item, key, f"{kp}.{key}", "unknown key (a repeated item has for_each, when, fields)")
    kind = item.get("for_each")
    if kind not in ("ORDER", "OBSERVATION"):
        ctx.problem(item, "for_each", f"{kp}.for_each", "for_each must be ORDER or OBSERVATION")
    when = compile_when(item, kp, ctx)
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
            inner = scope.inner(group)
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
