"""A rule's plan turned into closures: the value, the empty case (default/required), and what
happens when a format or table refuses a value (the next field of the chain, then on_invalid).

The code generator (compiler.py) inlines the plain shapes and calls these for the rest, so both
give the same values and warnings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.errors import REQUIRED_FIELD_MISSING, TABLE_VALUE_NOT_FOUND, ProcessingError, ProcessingWarning
from engine.mapping import paths as hp
from engine.mapping.context import (
    CONTAINERS,
    FALSY_EMPTY,
    OMIT,
    Evaluator,
    InvalidValue,
    RuleContext,
    add_warning,
    is_empty,
    location_for,
)
from engine.mapping.plan import RulePlan, TableStep

_MISSING: Any = object()


def _empty(v: Any) -> bool:
    return (not v and v.__class__ in FALSY_EMPTY) or (v.__class__ in CONTAINERS and is_empty(v))


def empty_closure(plan: RulePlan) -> Evaluator:
    """What the rule gives when its value came out empty: `default:`, then the `required:` check."""
    rc, default, required = plan.rule, plan.default, plan.required

    def on_empty(scope: Any) -> Any:
        v: Any = ""
        if default is not None:
            v = default(scope)
            if v is OMIT:
                v = ""
        if required and _empty(v):
            rc.fail(REQUIRED_FIELD_MISSING, "required field missing", location=location_for(rc.paths, scope))
        return v

    return on_empty


def format_closure(plan: RulePlan) -> Callable[[Any, Any], Any]:
    """The rule's formats applied to a value (a list from a [*] path item by item, unless `whole`)."""
    rc = plan.rule
    funcs = tuple((f.func, f.whole) for f in plan.formats)

    def fmt(v: Any, scope: Any) -> Any:
        for func, whole in funcs:
            if v.__class__ is list and not whole:
                v = [func(x, rc, scope) for x in v]
            else:
                v = func(v, rc, scope)
        return v

    return fmt


def transform_closure(plan: RulePlan) -> Callable[[Any, Any], Any]:
    """Formats, then tables: what the rule does to a value it read (raises on a bad one)."""
    fmt = format_closure(plan) if plan.formats else None
    lookups = tuple(table_lookup(plan.rule, step) for step in plan.tables)

    def transform(v: Any, scope: Any) -> Any:
        if fmt is not None:
            v = fmt(v, scope)
        for lookup in lookups:
            if _empty(v):
                break
            v = [lookup(x, scope) for x in v] if v.__class__ is list else lookup(v, scope)
        return v

    return transform


def recover_closure(plan: RulePlan) -> Callable[[ProcessingError, Any], Any]:
    """What a rule does when its format or table raised (never on the good path).

    An InvalidValue from the first field of a `from:` chain: the next non-empty field is tried
    (the bad one gets a warning). When none is valid, `on_invalid: reject` refuses with the first
    error; `drop` warns and carries on as if the field were empty (so `default:`, a derived study
    UID or `required:` still apply). Items of a [*] list are dropped one by one. Any other error
    gets its location and propagates.
    """
    rc, chain, drop = plan.rule, plan.chain, plan.on_invalid == "drop"
    transform = transform_closure(plan)
    get = plan.get

    def warning(exc: InvalidValue, action: str) -> ProcessingWarning:
        return ProcessingWarning(f"{exc.reason}; {action}", exc.code, exc.location, rc.source, rc.target)

    def recover(exc: ProcessingError, scope: Any) -> Any:
        if not isinstance(exc, InvalidValue):
            if not exc.location:
                exc.location = value_location(rc, scope)
            raise exc
        start, value = 0, get(scope)
        for i, (text, g) in enumerate(chain):
            v = g(scope)
            if not is_empty(v):
                start, value = i, v
                if not exc.location:
                    exc.location = text
                break
        if not exc.location:
            exc.location = value_location(rc, scope)
        if value.__class__ is list:
            return _each(value, exc, scope)
        bad = [exc]
        for text, g in chain[start + 1 :]:
            v = g(scope)
            if is_empty(v):
                continue
            try:
                v = transform(v, scope)
            except InvalidValue as again:
                again.location = again.location or text
                bad.append(again)
                continue
            for e in bad:
                add_warning(scope, warning(e, f"{text} used instead"))
            return v
        if not drop:
            raise exc
        for e in bad:
            add_warning(scope, warning(e, "value dropped"))
        return transform("", scope)  # as if the field were empty

    def _each(items: list[Any], exc: InvalidValue, scope: Any) -> Any:
        if not drop:
            raise exc
        kept = []
        for x in items:
            try:
                transform(x, scope)
            except InvalidValue as e:
                e.location = e.location or exc.location
                add_warning(scope, warning(e, "repetition dropped"))
                continue
            kept.append(x)
        return transform(kept, scope)

    return recover


def rule_closure(plan: RulePlan) -> Evaluator:
    """The plan as one closure scope -> value (or OMIT); the frequent shapes get a closure of
    their own, since every call saved counts on the hot path."""
    get, rc = plan.get, plan.rule
    if plan.plain_copy:
        return get
    single = plan.single_format
    on_empty = empty_closure(plan) if plan.has_fallback else None
    recover = recover_closure(plan)
    if plan.when is None and not plan.tables and plan.default is None:
        if single is not None and not plan.required:
            fmt = format_closure(plan)

            def formatted(scope: Any) -> Any:
                v = get(scope)
                try:
                    if v.__class__ is list:
                        return fmt(v, scope)
                    return single(v, rc, scope)
                except ProcessingError as exc:
                    return recover(exc, scope)

            return formatted
        if not plan.formats and on_empty is not None:

            def required_copy(scope: Any) -> Any:
                v = get(scope)
                if v.__class__ is str and v:
                    return v
                return on_empty(scope) if _empty(v) else v

            return required_copy

    transform = transform_closure(plan) if plan.formats or plan.tables else None
    when = plan.when

    def rule(scope: Any) -> Any:
        if when is not None and not when(scope):
            return OMIT
        v = get(scope)
        if transform is not None:
            try:
                v = transform(v, scope)
            except ProcessingError as exc:
                v = recover(exc, scope)
        if on_empty is not None and _empty(v):
            v = on_empty(scope)
        return v

    return rule


def value_location(rc: RuleContext, scope: Any) -> str:
    """The path that supplied the value (first non-empty), for an error in a format."""
    for text in rc.paths:
        try:
            if scope.get(hp.compile_path(text)):
                return text
        except Exception:  # noqa: BLE001 - best effort
            break
    return location_for(rc.paths, scope)


def table_lookup(rc: RuleContext, step: TableStep) -> Callable[[Any, Any], Any]:
    """code -> value through one table; a code it lacks follows the step's on_missing."""
    table, on_missing = step.table, step.on_missing
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
        rc.invalid(TABLE_VALUE_NOT_FOUND, f"code not in table {table.name}")

    return lookup
