"""How compiled rules read the message: through a per-run Scope over the ER7 view.

Reads are memoised per group (and per message for patient-level segments), segments the message
lacks are skipped with one substring test, and composite values come back as `Parts` (decoded
components that can still give the subcomponents of one of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.mapping import paths as hp
from engine.mapping.context import Evaluator

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

    __slots__ = ("view", "msg", "text", "memo", "top_memo", "warnings")

    def __init__(
        self,
        view: Any,
        msg: Any,
        text: str | None = None,
        top_memo: dict[str, Any] | None = None,
        warnings: list[Any] | None = None,
    ) -> None:
        self.view = view
        self.msg = msg
        self.text = text if text is not None else "\r" + msg.text
        self.memo: dict[str, Any] = {}  # path text -> value, for this group
        self.top_memo: dict[str, Any] = {} if top_memo is None else top_memo  # message-level, shared
        self.warnings = warnings  # where dropped values are reported (None: nobody asked)

    def inner(self, group: Any) -> Scope:
        """The scope of one group of this message (same text, message memo and warnings)."""
        return Scope(group, self.msg, self.text, self.top_memo, self.warnings)

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


@dataclass(frozen=True)
class Read:
    """One plain read of a rule, as data the code generator can inline.

    marker: "\\rOBR", the substring that tells the message has the segment ("" for MSH: always there);
    top: a message-level segment, read from the message rather than the group.
    """

    text: str  # "OBR-18", as the mapping wrote it (and as ERR-2 names it)
    marker: str
    top: bool
    path: Any  # the ER7 view's compiled path


def read_of(text: str) -> Read:
    seg = hp.segment_of(text)
    return Read(text, "" if seg == "MSH" else "\r" + seg, seg in MESSAGE_LEVEL, hp.compile_path(text))


def first_text(reads: tuple[Read, ...]) -> Evaluator:
    """First non-empty of several plain reads, in one closure (the hot case)."""
    if len(reads) == 1:
        return _one_text(reads[0])
    specs = tuple((r.text, r.marker, r.top, r.path) for r in reads)

    def first(scope: Scope) -> str:
        text = scope.text
        for key, marker, top, path in specs:
            if marker and marker not in text:
                continue  # the message has no such segment
            memo = scope.top_memo if top else scope.memo
            v = memo.get(key)
            if v is None:
                v = memo[key] = (scope.msg if top else scope.view).get(path)
            if v:
                return v
        return ""

    return first


def _one_text(read: Read) -> Evaluator:
    key, marker, top, path = read.text, read.marker, read.top, read.path

    def get(scope: Scope) -> str:
        if marker and marker not in scope.text:
            return ""
        memo = scope.top_memo if top else scope.memo
        v = memo.get(key)
        if v is None:
            v = memo[key] = (scope.msg if top else scope.view).get(path)
        return v

    return get


class Parts(tuple):  # noqa: SLOT001 - instances carry where they came from
    """Decoded components of one value; `sub(i)` reads the subcomponents of component i."""

    def sub(self, i: int) -> list[str]:
        view, text = self.view, self.text  # type: ignore[attr-defined]  # set by parts() on every instance
        if text.count(".") >= 1 and hp.has_component(text):
            return [self[i]] if i < len(self) else []  # already subcomponents
        return view.components(hp.compile_path(f"{text}.{i + 1}"))


def parts(c: list[str], view: Any, text: str) -> Any:
    """Components as a Parts (that knows where it came from), or "" when all are empty."""
    if not any(c):
        return ""
    p = Parts(c)
    p.view = view  # type: ignore[attr-defined]  # a tuple subclass without slots takes attributes
    p.text = text  # type: ignore[attr-defined]  # (same)
    return p


def getter(read: Read, many: bool, components: bool) -> Evaluator:
    """The value of one path: text, the list of its repetitions ([*]), or its decoded components."""
    text, marker, top, path = read.text, read.marker, read.top, read.path
    if not components:
        if many:

            def get_all(scope: Scope) -> Any:
                if marker and marker not in scope.text:
                    return []
                return (scope.msg if top else scope.view).get_all(path)

            return get_all
        return first_text((read,))
    if not many:

        def comps(scope: Scope) -> Any:
            if marker and marker not in scope.text:
                return ""
            view = scope.msg if top else scope.view
            return parts(view.components(path), view, text)  # a tuple: one value (a list: repetitions)

        return comps

    def comps_each(scope: Scope) -> Any:
        if marker and marker not in scope.text:
            return []
        view = scope.msg if top else scope.view
        n = len(view.get_all(path))
        out = []
        for i in range(1, n + 1):
            rep = hp.repetition_path(text, i)
            out.append(parts(view.components(hp.compile_path(rep)), view, rep))
        return out

    return comps_each
