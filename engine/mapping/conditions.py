"""`when:` conditions, compiled once into predicates over a message or group.

Grammar (what an interface analyst writes):
    cond   := term ('or' term)*
    term   := factor ('and' factor)*
    factor := 'not' factor | '(' cond ')' | PATH op
    op     := '==' VALUE | '!=' VALUE | 'in' '[' VALUE (',' VALUE)* ']' | 'not in' [...]
              | 'is empty' | 'is not empty'
VALUE is a quoted string ('CA' or "CA") or a bare word (CA, 2.5.1). A path that repeats
(`PID-3[*]`) is true when any repetition satisfies the comparison.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Predicate = Callable[[Any], bool]
PathCompiler = Callable[[str], Any]  # raises ValueError on a bad path

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'[^']*'|\"[^\"]*\")|(?P<op>==|!=|\(|\)|\[|\]|,)|(?P<word>(?:[^\s=!()\[\],'\"]|\[(?:[0-9]+|\*)\])+))"
)


class ConditionError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ConditionError(f"cannot read condition at {text[pos:]!r}")
        pos = m.end()
        if m.group("str") is not None:
            out.append(("value", m.group("str")[1:-1]))
        elif m.group("op") is not None:
            out.append(("op", m.group("op")))
        else:
            out.append(("word", m.group("word")))
    return out


class _Parser:
    def __init__(self, text: str, compile_path: PathCompiler, is_list: Callable[[str], bool]) -> None:
        self.toks = _tokens(text)
        self.i = 0
        self.compile_path = compile_path
        self.is_list = is_list
        self.paths: list[str] = []

    def peek(self, k: int = 0) -> tuple[str, str] | None:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def next(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise ConditionError("condition ends too early")
        self.i += 1
        return tok

    def word(self, w: str, k: int = 0) -> bool:
        tok = self.peek(k)
        return tok is not None and tok[0] == "word" and tok[1].lower() == w

    def op(self, o: str) -> bool:
        tok = self.peek()
        return tok is not None and tok == ("op", o)

    def parse(self) -> Predicate:
        pred = self.cond()
        if self.peek() is not None:
            raise ConditionError(f"unexpected {self.peek()[1]!r} (join conditions with and / or)")  # type: ignore[index]  # peek() is not None here
        return pred

    def cond(self) -> Predicate:
        parts = [self.term()]
        while self.word("or"):
            self.i += 1
            parts.append(self.term())
        if len(parts) == 1:
            return parts[0]
        return lambda s: any(p(s) for p in parts)

    def term(self) -> Predicate:
        parts = [self.factor()]
        while self.word("and"):
            self.i += 1
            parts.append(self.factor())
        if len(parts) == 1:
            return parts[0]
        return lambda s: all(p(s) for p in parts)

    def factor(self) -> Predicate:
        if self.word("not") and not self.word("in", 1):
            self.i += 1
            inner = self.factor()
            return lambda s: not inner(s)
        if self.op("("):
            self.i += 1
            inner = self.cond()
            if not self.op(")"):
                raise ConditionError("missing )")
            self.i += 1
            return inner
        kind, text = self.next()
        if kind != "word":
            raise ConditionError(f"expected an HL7 path, got {text!r}")
        return self.comparison(text)

    def value(self) -> str:
        kind, text = self.next()
        if kind == "op":
            raise ConditionError(f"expected a value, got {text!r}")
        return text

    def values(self) -> frozenset[str]:
        if not self.op("["):
            raise ConditionError("`in` needs a list: in [CT, MR]")
        self.i += 1
        vals = []
        while True:
            vals.append(self.value())
            kind, text = self.next()
            if (kind, text) == ("op", "]"):
                return frozenset(vals)
            if (kind, text) != ("op", ","):
                raise ConditionError("list items are separated by commas: [CT, MR]")

    def comparison(self, path_text: str) -> Predicate:
        try:
            path = self.compile_path(path_text)
        except ValueError as exc:
            raise ConditionError(f"bad path {path_text!r}: {exc}") from exc
        self.paths.append(path_text)
        many = self.is_list(path_text)

        def values(s: Any) -> list[str]:
            return s.get_all(path) if many else [s.get(path)]

        kind, text = self.next()
        if (kind, text) == ("op", "=="):
            v = self.value()
            return lambda s: any(x == v for x in values(s))
        if (kind, text) == ("op", "!="):
            v = self.value()
            return lambda s: all(x != v for x in values(s))
        if kind == "word" and text.lower() == "in":
            vs = self.values()
            return lambda s: any(x in vs for x in values(s))
        if kind == "word" and text.lower() == "not" and self.word("in"):
            self.i += 1
            vs = self.values()
            return lambda s: all(x not in vs for x in values(s))
        if kind == "word" and text.lower() == "is":
            negate = False
            if self.word("not"):
                self.i += 1
                negate = True
            if not self.word("empty"):
                raise ConditionError("write `is empty` or `is not empty`")
            self.i += 1
            if negate:
                return lambda s: any(x != "" for x in values(s))
            return lambda s: all(x == "" for x in values(s))
        raise ConditionError(f"after {path_text} expected ==, !=, in, not in, is empty or is not empty")


def parse_condition(
    text: str, compile_path: PathCompiler, is_list: Callable[[str], bool]
) -> tuple[Predicate, list[str]]:
    """Compile `text`; returns the predicate and the HL7 paths it reads. Raises ConditionError."""
    if not isinstance(text, str) or not text.strip():
        raise ConditionError("a condition must be text, e.g. ORC-1 == 'NW'")
    p = _Parser(text, compile_path, is_list)
    return p.parse(), p.paths


def compile_condition(text: str) -> Predicate:
    """A message-level predicate for channel filters (`filter: when:`); ValueError when bad."""
    from engine.mapping import paths

    pred, _ = parse_condition(text, paths.compile_path, paths.is_list)
    return pred
