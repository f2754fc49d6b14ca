"""What one compiled rule does, as data: the closure builder (closures.py) and the code generator
(compiler.py) both read it, so neither has to guess the other's shortcuts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.mapping.context import Evaluator, RuleContext
from engine.mapping.formats import Format, FormatFunc
from engine.mapping.reading import Read
from engine.mapping.tables import CodeTable


@dataclass(frozen=True)
class TableStep:
    """One `map:`/`table:` applied to the value; on_missing is error, default or keep."""

    table: CodeTable
    on_missing: str


@dataclass(frozen=True)
class RulePlan:
    """One rule of a mapping, compiled but not yet turned into code.

    `get` always gives the value before formats and tables. When it is nothing but plain reads,
    `reads` lists them (first non-empty text wins) or `component_reads` does (first field with a
    non-empty component, as a Parts): the code generator then inlines the read. A value that
    fails a format or table goes to `recover_closure(plan)` (closures.py): the next field of `chain`,
    then `on_invalid`.
    """

    rule: RuleContext  # target, source line, paths, settings, format options
    get: Evaluator
    reads: tuple[Read, ...] = ()
    component_reads: tuple[Read, ...] = ()
    formats: tuple[Format, ...] = ()
    tables: tuple[TableStep, ...] = ()
    default: Evaluator | None = None  # a literal, a template or a fallback rule's closure
    required: bool = False
    when: Callable[[Any], bool] | None = None
    on_invalid: str = "reject"  # drop | reject: a value that fails its format or table
    chain: tuple[tuple[str, Evaluator], ...] = ()  # each `from:` path alone: the fallback on garbage

    @property
    def plain_copy(self) -> bool:
        """The value is what `get` read, nothing else."""
        return not (self.formats or self.tables or self.default is not None or self.required or self.when)

    @property
    def has_fallback(self) -> bool:
        """default:/required: act on an empty value."""
        return self.default is not None or self.required

    @property
    def single_format(self) -> FormatFunc | None:
        """The one format of the rule when it converts item by item (the frequent case)."""
        if len(self.formats) == 1 and not self.formats[0].whole:
            return self.formats[0].func
        return None
