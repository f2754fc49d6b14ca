"""Reading YAML configuration with line numbers, `${NAME:-default}` substitution, and errors
that cite file, line and key.

Every problem is collected (a typo must not hide the next one) and reported as
`file:line:col key: message`. Pydantic error locations are joined back to the YAML nodes.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    column: int
    key: str
    message: str

    def __str__(self) -> str:
        key = f" {self.key}:" if self.key else ""
        return f"{self.file}:{self.line}:{self.column}{key} {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def substitute_env(text: str, env: Mapping[str, str], missing: list[str]) -> str:
    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                missing.append(name)
                return ""
            return default
        return value

    return ENV_REF.sub(repl, text)


class YamlDocument:
    """A parsed YAML file that remembers where each key came from."""

    def __init__(self, path: Path, data: Any, display: str) -> None:
        self.path = path
        self.data = data
        self.display = display

    def locate(self, loc: tuple[Any, ...]) -> tuple[int, int]:
        """1-based (line, column) of the deepest node on `loc` that exists."""
        node = self.data
        line, col = 1, 1
        for part in loc:
            if isinstance(node, CommentedMap) and part in node:
                ln, cl = node.lc.key(part)
                line, col = ln + 1, cl + 1
                node = node[part]
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
                ln, cl = node.lc.item(part)
                line, col = ln + 1, cl + 1
                node = node[part]
            else:
                break
        return line, col

    def problem(self, loc: tuple[Any, ...], message: str) -> Problem:
        line, col = self.locate(loc)
        key = ".".join(str(p) for p in loc)
        return Problem(self.display, line, col, key, message)


def read_yaml(
    path: Path, *, env: Mapping[str, str] | None = None, display: str | None = None
) -> tuple[YamlDocument | None, list[Problem]]:
    """Parse `path` and substitute environment references in every string scalar."""
    shown = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return None, [Problem(shown, 1, 1, "", f"cannot read file: {exc.strerror}")]
    try:
        data = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return None, [Problem(shown, line, col, "", f"YAML syntax error: {exc.problem}")]
    doc = YamlDocument(path, data if data is not None else CommentedMap(), shown)
    problems: list[Problem] = []
    _substitute(doc, doc.data, (), os.environ if env is None else env, problems)
    return doc, problems


def _substitute(
    doc: YamlDocument, node: Any, loc: tuple[Any, ...], env: Mapping[str, str], problems: list[Problem]
) -> None:
    items: Any
    if isinstance(node, CommentedMap):
        items = list(node.items())
    elif isinstance(node, CommentedSeq):
        items = list(enumerate(node))
    else:
        return
    for key, value in items:
        if isinstance(value, str) and "${" in value:
            missing: list[str] = []
            # "2575" validates as an int where the model wants one (pydantic lax mode)
            node[key] = substitute_env(value, env, missing)
            for name in missing:
                problems.append(
                    doc.problem(
                        (*loc, key),
                        f"environment variable {name} is not set and has no default (write ${{" + name + ":-default})",
                    )
                )
        else:
            _substitute(doc, value, (*loc, key), env, problems)


def validate(
    doc: YamlDocument, model: type[BaseModel], *, at: tuple[Any, ...] = (), data: Any = None
) -> tuple[Any, list[Problem]]:
    """Validate the whole document (or the node at `at`) into `model`, locating every error."""
    node = doc.data if data is None else data
    try:
        return model.model_validate(_plain(node)), []
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = at + tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; unknown keys are not ignored)"
                close = difflib.get_close_matches(str(loc[-1]), _keys_at(model, loc[len(at):-1]), n=1)
                if close:
                    msg = f"unknown key; did you mean {close[0]!r}?"
            elif err["type"] == "missing":
                msg = "required key is missing"
            problems.append(doc.problem(loc, msg))
        return None, problems


def _keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the (nested) model at `loc` knows, aliases included, for "did you mean"."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            return []
        current = _model_in(field.annotation)
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return []
    keys = []
    for name, field in current.model_fields.items():
        keys.append(field.alias or name)
    return keys


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside `X`, `X | None`, `list[X]` or `dict[str, X]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _plain(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_plain(v) for v in node]
    return node
