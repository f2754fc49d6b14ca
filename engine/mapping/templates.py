"""`value:` templates: literal text with `{PATH}` placeholders, e.g. "{OBR-3.1}-{OBR-3.2}".

`{{` and `}}` stand for literal braces. A template whose placeholders are all empty gives ""
(not "-"), so `default:` and `required:` still apply.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from engine.mapping.paths import compile_path

_PART = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


class TemplateError(ValueError):
    pass


def template_paths(text: str) -> list[str]:
    """The placeholders of `text` (raises TemplateError on a lone brace)."""
    paths = []
    for m in _PART.finditer(text):
        tok = m.group(0)
        if tok in ("{{", "}}"):
            continue
        if m.group(1) is None:
            raise TemplateError("a lone { or } (write {{ or }} for a literal brace)")
        paths.append(m.group(1).strip())
    return paths


def compile_template(text: str) -> Callable[[Any], str] | None:
    """A function scope -> str, or None when `text` has no placeholders (a plain literal)."""
    pieces: list[tuple[bool, Any]] = []  # (is_path, literal text or compiled path)
    pos = 0
    has_path = False
    for m in _PART.finditer(text):
        if m.start() > pos:
            pieces.append((False, text[pos : m.start()]))
        tok = m.group(0)
        if tok in ("{{", "}}"):
            pieces.append((False, tok[0]))
        elif m.group(1) is None:
            raise TemplateError("a lone { or } (write {{ or }} for a literal brace)")
        else:
            try:
                pieces.append((True, compile_path(m.group(1).strip())))
            except ValueError as exc:
                raise TemplateError(f"{{{m.group(1)}}}: {exc}") from exc
            has_path = True
        pos = m.end()
    if pos < len(text):
        pieces.append((False, text[pos:]))
    if not has_path:
        return None

    def render(scope: Any) -> str:
        out = []
        filled = False
        for is_path, piece in pieces:
            if is_path:
                v = scope.get(piece)
                if v:
                    filled = True
                out.append(v)
            else:
                out.append(piece)
        return "".join(out) if filled else ""

    return render


def literal_text(text: str) -> str:
    """A template without placeholders, braces unescaped."""
    return text.replace("{{", "{").replace("}}", "}")
