"""A lazy view over one ER7 (pipe-delimited) HL7 v2 message.

hl7apy builds a full object tree and manages ~100 messages/s; the hot path only ever reads a
handful of fields. This view splits the text into segments once and splits a segment into fields
the first time a path touches it; repetitions and components are split on each read (they are
tiny), all by one function (_value). Paths are compiled once and cached. Groups (ORDER,
OBSERVATION) are derived by walking ORC -> OBR -> OBX, which also keeps Z-segments that hl7apy
would drop. A group owns what it holds: `ZDS-1` read in an order is that order's ZDS or nothing,
never another order's; `/ZDS-1` (a leading slash, as in HAPI's Terser) reads the message's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from engine.errors import DATA_TYPE_ERROR, SEGMENT_SEQUENCE_ERROR, ProcessingError, ProcessingWarning
from engine.hl7.charsets import decode_message, python_codec, resolve_charset
from engine.hl7.escape import escape, unescape

__all__ = ["Encoding", "Group", "Message", "Path", "Segment", "compile_path", "resolve_charset"]

ALL = 0  # a repetition index of [*]


class Encoding:
    """Delimiters from MSH-1 and MSH-2 (with the optional 5th, truncation, character)."""

    __slots__ = ("field", "component", "repetition", "escape", "subcomponent", "truncation")

    def __init__(
        self,
        field: str = "|",
        component: str = "^",
        repetition: str = "~",
        escape: str = "\\",
        subcomponent: str = "&",
        truncation: str | None = None,
    ) -> None:
        self.field = field
        self.component = component
        self.repetition = repetition
        self.escape = escape
        self.subcomponent = subcomponent
        self.truncation = truncation

    @property
    def msh2(self) -> str:
        """The encoding characters as written in MSH-2."""
        return self.component + self.repetition + self.escape + self.subcomponent + (self.truncation or "")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Encoding) and (self.field + self.msh2) == (other.field + other.msh2)

    def __hash__(self) -> int:
        return hash(self.field + self.msh2)

    def __repr__(self) -> str:
        return f"Encoding({self.field + self.msh2!r})"


DEFAULT_ENCODING = Encoding()


@lru_cache(maxsize=64)
def _encoding(fs: str, msh2: str) -> Encoding:
    """Validate MSH-1/MSH-2 once per distinct pair and share the Encoding."""
    chars = fs + msh2
    if len(msh2) not in (4, 5) or len(set(chars)) != len(chars):
        raise ProcessingError(
            "MSH-2 must hold 4 or 5 distinct encoding characters", DATA_TYPE_ERROR, "MSH-2", ack_code="AR"
        )
    if any(c.isalnum() or c in "\r\n " for c in chars):
        raise ProcessingError("invalid delimiter in MSH-1/MSH-2", DATA_TYPE_ERROR, "MSH-2", ack_code="AR")
    return Encoding(fs, msh2[0], msh2[1], msh2[2], msh2[3], msh2[4] if len(msh2) == 5 else None)


# ---------------------------------------------------------------------------------------- paths

_PATH_RE = re.compile(
    r"^(/)?([A-Z][A-Z0-9]{2})(?:\[(\d+|\*)\])?"  # '/' (from the message), segment and its occurrence
    r"(?:[-.](\d+)(?:\[(\d+|\*)\])?"  # field and its repetition
    r"(?:\.(\d+)(?:\.(\d+))?)?)?$"  # component, subcomponent
)


@dataclass(frozen=True, slots=True)
class Path:
    """A compiled path; None = not given (first), ALL (0) = [*].

    `root` (a leading '/', as in HAPI's Terser: '/ZDS-1') reads the message's segment even inside
    a group, where 'ZDS-1' means the group's own.
    """

    segment: str
    seg_rep: int | None
    field: int | None
    rep: int | None
    component: int | None
    subcomponent: int | None
    text: str
    root: bool = False

    def __str__(self) -> str:
        return self.text


def _index(s: str | None, what: str, path: str) -> int | None:
    if s is None:
        return None
    if s == "*":
        return ALL
    n = int(s)
    if n < 1:
        raise ValueError(f"invalid HL7 path {path!r}: {what} index is 1-based, got {n}")
    return n


@lru_cache(maxsize=4096)
def compile_path(path: str) -> Path:
    """Parse '[/]SEG[n]-FIELD[r].COMP.SUB' once; ValueError says what is wrong."""
    if not isinstance(path, str):
        raise ValueError(f"HL7 path must be a string, got {type(path).__name__}")
    m = _PATH_RE.match(path.strip().upper())
    if not m:
        raise ValueError(
            f"invalid HL7 path {path!r}: expected [/]SEG[n]-FIELD[rep].COMPONENT.SUBCOMPONENT, e.g. 'PID-3[2].4.1'"
            " ('/ZDS-1': the message's ZDS, not the group's)"
        )
    root, seg, srep, fld, frep, comp, sub = m.groups()
    f = _index(fld, "field", path)
    if f == ALL:  # pragma: no cover - the regex admits digits only
        raise ValueError(f"invalid HL7 path {path!r}")
    return Path(
        seg,
        _index(srep, "segment", path),
        f,
        _index(frep, "repetition", path),
        _index(comp, "component", path),
        _index(sub, "subcomponent", path),
        path,
        root is not None,
    )


def _compile(path: str | Path) -> Path:
    return path if path.__class__ is Path else compile_path(path)


# ------------------------------------------------------------------------------ value extraction


def _pick(value: str, sep: str, idx: int) -> str:
    if sep not in value:
        return value if idx == 1 else ""
    parts = value.split(sep)
    return parts[idx - 1] if idx <= len(parts) else ""


def _value(msg: Message, value: str, p: Path, raw: bool = False) -> str:
    """What path p names in one raw field: its repetition ([*] and none: the first), component and
    subcomponent, escapes decoded unless it still holds delimiters (a composite comes back as ER7)
    or `raw` is asked for (components() splits before it decodes).

    The one reading of a field: get(), get_all() and components() of every view come here, except
    Message.get, which holds an inlined copy (see there).
    """
    enc = msg.encoding
    rs = enc.repetition
    r = p.rep
    if rs in value:
        value = value[: value.index(rs)] if r is None or r == ALL else _pick(value, rs, r)
    elif r is not None and r > 1:
        return ""
    c = p.component
    if c is not None:
        cs = enc.component
        if cs in value:
            parts = value.split(cs)
            value = parts[c - 1] if c <= len(parts) else ""
        elif c > 1:
            return ""
        s = p.subcomponent
        if s is not None:
            value = _pick(value, enc.subcomponent, s)
        elif raw or enc.subcomponent in value:
            return value
    elif raw or enc.component in value or enc.subcomponent in value:
        return value
    if enc.escape in value and not raw:
        return unescape(value, enc, msg.codec)
    return value


def _read(msg: Message, fields: list[str], p: Path) -> str:
    """The first value path p selects in a segment's fields (what get() answers)."""
    f = p.field
    if f is None or f >= len(fields):
        return ""
    if f <= 2 and p.segment == "MSH":  # the delimiters themselves
        return fields[f]
    return _value(msg, fields[f], p)


# ---------------------------------------------------------------------------------- segments


class Segment:
    """One segment; `fields[n]` is SEG-n as raw ER7 (fields[0] is the name; MSH-1 is the separator)."""

    __slots__ = ("name", "_raw", "_fields", "_fs")

    def __init__(self, raw: str, fs: str) -> None:
        self.name = raw[:3]
        self._raw = raw
        self._fields: list[str] | None = None
        self._fs = fs

    @property
    def fields(self) -> list[str]:
        f = self._fields
        if f is None:
            f = self._fields = _split_fields(self._raw, self._fs)
        return f

    @property
    def raw(self) -> str:
        return self._raw

    def __repr__(self) -> str:
        return f"Segment({self.name})"


def _split_fields(raw: str, fs: str) -> list[str]:
    f = raw.split(fs)
    if f[0] == "MSH":
        f.insert(1, fs)
    return f


def _join_fields(fields: list[str], fs: str) -> str:
    if fields[0] == "MSH":
        return "MSH" + fs + fs.join(fields[2:])
    return fs.join(fields)


def _put(parts: list[str], idx: int, value: str) -> None:
    """Set parts[idx-1], extending with empties; trailing empties we created are not kept."""
    if idx > len(parts):
        if value == "":
            return
        parts.extend([""] * (idx - len(parts)))
    parts[idx - 1] = value


# ------------------------------------------------------------------------------------- views


_NONE: list[int] = []  # shared "no such segment" answer of _indexes (never changed)

_GROUP_CLOSERS = frozenset({"MSH", "PID", "PD1", "PV1", "PV2", "MRG", "EVN", "NK1", "GT1", "IN1", "IN2", "IN3"})

# Segments an ORDER group owns even when this message has them outside every order: a group
# without its own never reads the message's (a patient-level NTE or OBX is not the order's). Any
# other segment the message places inside an order (a Z-segment such as ZDS, DG1 in ORM, ...) is
# owned too; the rest (MSH, PID, PV1, AL1 before the first ORC ...) are read from the message.
ORDER_SEGMENTS = frozenset(
    {"ORC", "OBR", "TQ1", "TQ2", "IPC", "NTE", "OBX", "ZDS", "CTD", "CTI", "BLG", "RQD", "RQ1", "ODS", "ODT",
     "SPM", "SAC", "FT1", "TCD"}
)
OBSERVATION_SEGMENTS = frozenset({"OBX", "NTE"})


class _View:
    """What Message and Group share: path access over a list of segment indexes."""

    __slots__ = ()
    _msg: Message

    def _indexes(self, name: str) -> list[int]:
        raise NotImplementedError

    def _all_indexes(self) -> list[int]:
        raise NotImplementedError

    def _nth(self, name: str, n: int) -> int:
        """Index of the n-th (1-based) segment called name, -1 if there is none."""
        idx = self._indexes(name)
        return idx[n - 1] if n <= len(idx) else -1

    def get(self, path: str | Path) -> str:
        raise NotImplementedError

    def get_all(self, path: str | Path) -> list[str]:
        """Every match: one per selected segment and repetition ([*] gives each non-empty field's repetitions)."""
        p = _compile(path)
        msg = self._msg
        f = p.field
        if f is None:
            return []
        idx = (msg if p.root else self)._indexes(p.segment)
        sr = p.seg_rep
        if sr is not None and sr != ALL:
            idx = idx[sr - 1 : sr]
        enc = msg.encoding
        rs = enc.repetition
        out: list[str] = []
        for i in idx:
            fields = msg._fields(i)
            if p.rep != ALL or (f <= 2 and p.segment == "MSH"):
                out.append(_read(msg, fields, p))
                continue
            value = fields[f] if f < len(fields) else ""
            if value:  # each repetition, read as if it were the field's only one
                out.extend(_value(msg, r, p) for r in value.split(rs))
        return out

    def components(self, path: str | Path) -> list[str]:
        """Decoded components of the field (or subcomponents of the component) the path names.

        Split before decoding, so an escaped delimiter never splits; a component that itself holds
        subcomponents is returned as raw ER7 (like get()), to be read with a PATH.N path.
        """
        p = path if path.__class__ is Path else compile_path(path)
        if p.subcomponent is not None:
            return [self.get(p)]
        msg = self._msg
        idx = (msg if p.root else self)._indexes(p.segment)
        n = p.seg_rep or 1
        f = p.field
        if n > len(idx) or f is None:
            return []
        i = idx[n - 1]
        fields = msg._split.get(i) or msg._fields(i)
        if f >= len(fields):
            return []
        raw = fields[f]
        enc = msg.encoding
        if (f > 2 or p.segment != "MSH") and (p.rep is not None or p.component is not None or enc.repetition in raw):
            raw = _value(msg, raw, p, raw=True)  # the repetition (and component) as written
        if raw == "":
            return []
        sep = enc.component if p.component is None else enc.subcomponent
        if enc.escape not in raw:  # nothing to decode
            return raw.split(sep)
        codec = msg.codec
        es, ss = enc.escape, enc.subcomponent
        if p.component is None:  # a component that holds subcomponents stays raw, as get() gives it
            return [unescape(x, enc, codec) if es in x and ss not in x else x for x in raw.split(sep)]
        return [unescape(x, enc, codec) if es in x else x for x in raw.split(sep)]

    def segments(self, name: str | None = None) -> list[Segment]:
        """Segments of this view, all or those named `name`."""
        idx = self._all_indexes() if name is None else self._indexes(name)
        return [self._msg._segment(i) for i in idx]

    def groups(self, kind: str) -> list[Group]:
        """ORDER groups (ORC/OBR and what follows) or OBSERVATION groups (OBX + NTE) inside this view.

        An ORDER group runs from an ORC (or an OBR not preceded by its ORC) up to the next ORC/OBR
        that starts another order, or to a patient/visit segment: everything in between (TQ1, NTE,
        IPC, OBX, DG1, Z-segments ...) is that order's.
        """
        kind = kind.upper()
        msg = self._msg
        names = msg._names()
        out: list[Group] = []
        cur: list[int] | None = None
        if kind == "ORDER":
            extra: set[str] = set()
            has_obr = False
            started_by_orc = False
            for i in self._all_indexes():
                n = names[i]
                if n == "ORC" or (n == "OBR" and (cur is None or has_obr or not started_by_orc)):
                    cur = [i]
                    out.append(Group(msg, "ORDER", cur, self, ORDER_SEGMENTS))
                    started_by_orc = n == "ORC"
                    has_obr = n == "OBR"
                elif n in _GROUP_CLOSERS:
                    cur = None
                elif cur is not None:
                    cur.append(i)
                    if n not in ORDER_SEGMENTS:  # a Z-segment, DG1 ...: owned by the orders too
                        extra.add(n)
                    elif n == "OBR":
                        has_obr = True
            if extra:
                owned = ORDER_SEGMENTS | extra
                for g in out:
                    g._owned = owned
        elif kind == "OBSERVATION":
            # from the message, an observation falls back to the order it sits in, not to the first
            parent_of: dict[int, _View] = {}
            if self is msg:
                for order in self.groups("ORDER"):
                    for i in order._idx:
                        parent_of[i] = order
            for i in self._all_indexes():
                n = names[i]
                if n == "OBX":
                    cur = [i]
                    out.append(Group(msg, "OBSERVATION", cur, parent_of.get(i, self), OBSERVATION_SEGMENTS))
                elif n == "NTE" and cur is not None:
                    cur.append(i)
                else:
                    cur = None
        else:
            raise ValueError(f"unknown group kind {kind!r}: use 'ORDER' or 'OBSERVATION'")
        return out

    def set(self, path: str | Path, value: str, *, raw: bool = False) -> None:
        """Write a value (escaped unless raw=True); missing segments/fields/components are created."""
        p = _compile(path)
        msg = self._msg
        if p.root and self is not msg:
            msg.set(p, value, raw=raw)
            return
        if p.field is None:
            raise ValueError(f"cannot set {p.text!r}: a field number is needed")
        if ALL in (p.seg_rep, p.rep):
            raise ValueError(f"cannot set {p.text!r}: [*] selects many values")
        if p.segment == "MSH" and p.field <= 2:
            raise ValueError("MSH-1 and MSH-2 (the delimiters) cannot be set")
        enc = msg.encoding
        text = value if raw else escape(value, enc)
        idx = self._indexes(p.segment)
        want = p.seg_rep or 1
        if want <= len(idx):
            i = idx[want - 1]
        elif want == len(idx) + 1:
            i = self._append_segment(p.segment)
        else:
            raise ValueError(f"cannot set {p.text!r}: only {len(idx)} {p.segment} segment(s)")
        fields = list(msg._fields(i))
        old = fields[p.field] if p.field < len(fields) else ""
        reps = old.split(enc.repetition) if old else [""]
        rep_i = p.rep or 1
        cur = reps[rep_i - 1] if rep_i <= len(reps) else ""
        if p.component is None:
            cur = text
        else:
            comps = cur.split(enc.component)
            if p.subcomponent is None:
                _put(comps, p.component, text)
            else:
                comp = comps[p.component - 1] if p.component <= len(comps) else ""
                subs = comp.split(enc.subcomponent)
                _put(subs, p.subcomponent, text)
                _put(comps, p.component, enc.subcomponent.join(subs))
            cur = enc.component.join(comps)
        _put(reps, rep_i, cur)
        _put(fields, p.field + 1, enc.repetition.join(reps))  # fields[n] is SEG-n
        msg._replace(i, fields)

    def _append_segment(self, name: str) -> int:
        return self._msg._append(name)


class Group(_View):
    """A run of segments (ORDER or OBSERVATION) that owns them.

    A segment the group holds is read from the group. One it lacks is read from its parent (the
    message, or the order an observation sits in) unless it is a kind the group owns (`_owned`:
    ORC, OBR, ZDS, ... for an order): the second order of a message never reads the first one's
    ZDS. '/ZDS-1' still reads the message's.
    """

    __slots__ = ("_msg", "kind", "_idx", "_parent", "_own", "_owned")

    def __init__(self, msg: Message, kind: str, indexes: list[int], parent: _View, owned: frozenset[str]) -> None:
        self._msg = msg
        self.kind = kind
        self._idx = indexes  # still grows while groups() walks the message: _own is built on first read
        self._parent = parent
        self._own: dict[str, list[int]] | None = None
        self._owned = owned

    def _all_indexes(self) -> list[int]:
        return self._idx

    def _own_indexes(self) -> dict[str, list[int]]:
        """Segment name -> this group's own indexes, built once (a group's segments never change)."""
        names = self._msg._names()
        own: dict[str, list[int]] = {}
        for i in self._idx:
            n = names[i]
            if n in own:
                own[n].append(i)
            else:
                own[n] = [i]
        self._own = own
        return own

    def _indexes(self, name: str) -> list[int]:
        own = (self._own or self._own_indexes()).get(name)
        if own is not None:
            return own
        # the parent is asked each time: a segment appended to the message later must be seen
        return _NONE if name in self._owned else self._parent._indexes(name)

    def get(self, path: str | Path) -> str:
        """First match, escapes decoded; '' if absent. Composite values come back as raw ER7."""
        p = path if path.__class__ is Path else compile_path(path)
        msg = self._msg
        if p.root:
            return msg.get(p)
        # _indexes inlined: this is the read of every `for_each` rule
        name = p.segment
        idx = (self._own or self._own_indexes()).get(name)
        if idx is None:
            if name in self._owned:
                return ""
            idx = self._parent._indexes(name)
        sr = p.seg_rep or 1
        f = p.field
        if sr > len(idx) or f is None:
            return ""
        i = idx[sr - 1]
        fields = msg._split.get(i)
        if fields is None:
            fields = msg._fields(i)
        if f >= len(fields):
            return ""
        return fields[f] if f <= 2 and name == "MSH" else _value(msg, fields[f], p)

    def _append_segment(self, name: str) -> int:
        raise ValueError(f"cannot create a {name} segment inside a group; set it on the message")

    def __repr__(self) -> str:
        names = self._msg._names()
        return f"Group({self.kind}: {' '.join(names[i] for i in self._idx)})"


_LEAD = "\ufeff\x0b \t\r\n"
_CODED_MSH = (9, 11, 12, 15, 16)  # MSH fields that hold codes (type, processing id, version, ack types)


def _drop_blank_segments(text: str) -> str:
    """CR-separated text with blank or whitespace-only segments left out, CR-terminated."""
    return "\r".join(s for s in text.split("\r") if s.strip()) + "\r"


def _trim_msh(text: str, end: int, fields: list[str], enc: Encoding) -> str:
    """Strip spaces/tabs around the components of MSH's coded fields ("2.3 " -> "2.3"), in `fields` too."""
    changed = False
    for n in _CODED_MSH:
        if n - 1 < len(fields):
            old = fields[n - 1]
            new = enc.component.join(c.strip(" \t") for c in old.split(enc.component))
            if new != old:
                fields[n - 1] = new
                changed = True
    return enc.field.join(fields) + text[end:] if changed else text


class Message(_View):
    """Lazy view of one ER7 message. Build with Message.parse(bytes | str, charset=None).

    Until something needs the segment list (segments(), groups(), get_all(), set(), a segment
    index above 1), get() finds the first segment of a name with one str.find on the text and
    splits only that segment: most messages are read a handful of times and never split whole.

    `charset_guessed` is True when the bytes declared no charset (no MSH-18, no channel charset)
    and were not UTF-8, so they were read as Windows-1252; `warnings` then says so, to be stored
    with the message and answered in the ACK.
    """

    __slots__ = (
        "_msg", "_text", "_raw", "_split", "_nm", "_first", "_byname", "_segs", "encoding", "_codec", "charset_guessed"
    )

    def __init__(
        self, text: str, encoding: Encoding, codec: str | None = "utf-8", charset_guessed: bool = False
    ) -> None:
        self._msg = self
        self._text: str | None = text  # CR-terminated; None once a set() changed the segments
        self._raw: list[str] | None = None  # segment texts, once materialised
        self._split: dict[int, list[str]] = {}  # segment index -> fields, split on first use
        self._nm: list[str] | None = None
        self._first: dict[str, int] | None = None
        self._byname: dict[str, list[int]] | None = None  # segment name -> indexes, once asked
        self._segs: list[Segment | None] | None = None
        self.encoding = encoding
        self._codec = codec  # the Python codec the bytes were decoded with (None: pure ASCII, see codec)
        self.charset_guessed = charset_guessed

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def parse(cls, data: bytes | str | bytearray | memoryview, charset: str | None = None) -> Message:
        """Parse ER7 as senders really write it; bytes decoded with `charset`, else MSH-18, else UTF-8.

        Tolerated: a UTF-8 byte order mark, whitespace, blank lines or a stray MLLP start byte
        before MSH; CR, LF or CRLF terminators, mixed; no final terminator; spaces or tabs around
        the coded MSH fields (MSH-9, -11, -12, -15, -16: "2.3 " is 2.3); undeclared bytes that are
        not UTF-8 (read as Windows-1252, see charset_guessed).
        """
        guessed = False
        if data.__class__ is str:
            text = data
            codec = resolve_charset(charset) if charset else None
        elif charset is None and data.__class__ is bytes and b"\x1b" not in data:
            try:  # pure ASCII reads the same in every charset we accept: skip the MSH-18 scan
                text, codec = data.decode("ascii"), None
            except UnicodeDecodeError:
                text, codec, guessed = decode_message(data, charset)
        else:
            text, codec, guessed = decode_message(bytes(data), charset)  # type: ignore[arg-type]  # str went above
        if text[:3] != "MSH":
            text = text.lstrip(_LEAD)
            if text[:3] != "MSH":
                raise ProcessingError(
                    "message does not start with an MSH segment", SEGMENT_SEQUENCE_ERROR, "MSH", ack_code="AR"
                )
        if "\n" in text:
            text = text.replace("\r\n", "\r").replace("\n", "\r")
            if "\r\r" in text:  # blank lines
                text = _drop_blank_segments(text)
        if text[-1] != "\r" or text[-2] == "\r":  # (substring scans cost ~1 us each: only the tail is checked)
            text = _drop_blank_segments(text)
        end = text.find("\r")
        if end < 8:
            raise ProcessingError(
                "MSH segment too short to hold its delimiters", DATA_TYPE_ERROR, "MSH-2", ack_code="AR"
            )
        # MSH is read from every message (control id, type): split it now, once
        fs = text[3]
        msh = text[:end]
        fields = msh.split(fs)  # fields[k] is MSH-(k+1) until the insert below
        enc = _encoding(fs, fields[1])
        if " " in msh or "\t" in msh:
            text = _trim_msh(text, end, fields, enc)
        fields.insert(1, fs)
        m = cls(text, enc, codec, guessed)
        m._split[0] = fields
        return m

    # -- internals used by views --------------------------------------------------------------
    def _segments_raw(self) -> list[str]:
        """The segment list, split from the text the first time something needs it."""
        raw = self._raw
        if raw is None:
            assert self._text is not None
            raw = self._text[:-1].split("\r")
            if "" in raw:  # blank segments in a CR-only text
                raw = [s for s in raw if s]
                self._text = "\r".join(raw) + "\r"
            self._raw = raw
        return raw

    def _names(self) -> list[str]:
        nm = self._nm
        if nm is None:
            nm = self._nm = [s[:3] for s in self._segments_raw()]
        return nm

    def _fields(self, i: int) -> list[str]:
        f = self._split.get(i)
        if f is None:
            f = self._split[i] = _split_fields(self._segments_raw()[i], self.encoding.field)
        return f

    def _indexes(self, name: str) -> list[int]:
        """Indexes of the segments called name (a cached list: callers must not change it)."""
        by = self._byname
        if by is None:
            by = {}
            for i, n in enumerate(self._names()):
                if n in by:
                    by[n].append(i)
                else:
                    by[n] = [i]
            self._byname = by
        return by.get(name, _NONE)

    def _all_indexes(self) -> list[int]:
        return list(range(len(self._segments_raw())))

    def _first_fields(self, name: str) -> list[str] | None:
        """Fields of the first segment called name (None if absent)."""
        first = self._first
        if first is None:
            first = self._first = {}
            for i, seg in enumerate(self._segments_raw()):
                n = seg[:3]
                if n not in first:
                    first[n] = i
        i = first.get(name, -1)
        if i < 0:
            return None
        f = self._split.get(i)
        if f is None:
            f = self._split[i] = _split_fields(self._raw[i], self.encoding.field)  # type: ignore[index]  # raw segments are split once parsed
        return f

    def get(self, path: str | Path) -> str:
        """First match, escapes decoded; '' if absent. Composite values come back as raw ER7."""
        # the hot path: nothing split that the path does not touch
        p = path if path.__class__ is Path else compile_path(path)
        sr = p.seg_rep
        if sr and sr > 1:
            i = self._nth(p.segment, sr)
            fields = self._fields(i) if i >= 0 else None
        else:
            fields = self._first_fields(p.segment)
        f = p.field
        if fields is None or f is None or f >= len(fields):
            return ""
        value = fields[f]
        if f <= 2 and p.segment == "MSH":
            return value
        # _value inlined, kept for speed: this is the read of MSH-10, PID-3 ... of every message.
        # Calling _value here measured 4-10% slower on benchmarks/mapping.py's view figure (parse +
        # 5 reads; in-process A/B, best of 80 passes) and ~15% on the five reads alone.
        enc = self.encoding
        rs = enc.repetition
        r = p.rep
        if rs in value:
            if r is None or r == ALL:
                value = value[: value.index(rs)]
            else:
                value = _pick(value, rs, r)
        elif r is not None and r > 1:
            return ""
        c = p.component
        if c is not None:
            cs = enc.component
            if cs in value:
                parts = value.split(cs)
                value = parts[c - 1] if c <= len(parts) else ""
            elif c > 1:
                return ""
            s = p.subcomponent
            if s is not None:
                value = _pick(value, enc.subcomponent, s)
            elif enc.subcomponent in value:
                return value
        elif enc.component in value or enc.subcomponent in value:
            return value
        if enc.escape in value:
            return unescape(value, enc, self.codec)
        return value

    def _segment(self, i: int) -> Segment:
        raw = self._segments_raw()
        if self._segs is None:
            self._segs = [None] * len(raw)
        s = self._segs[i]
        if s is None:
            s = self._segs[i] = Segment(raw[i], self.encoding.field)
            s._fields = self._split.get(i)
        return s

    def _replace(self, i: int, fields: list[str]) -> None:
        raw = self._segments_raw()
        raw[i] = _join_fields(fields, self.encoding.field)
        self._split[i] = fields
        if self._segs is not None and self._segs[i] is not None:
            seg = self._segs[i]
            assert seg is not None
            seg._raw = raw[i]
            seg._fields = fields
        self._text = None

    def _append(self, name: str) -> int:
        raw = self._segments_raw()
        raw.append(name)
        if self._segs is not None:
            self._segs.append(None)
        if self._nm is not None:
            self._nm.append(name)
        if self._first is not None:
            self._first.setdefault(name, len(raw) - 1)
        self._byname = None
        self._text = None
        return len(raw) - 1

    # -- output ------------------------------------------------------------------------------
    def to_er7(self) -> str:
        """The message as ER7, each segment terminated by CR."""
        t = self._text
        if t is None:
            t = self._text = "\r".join(self._segments_raw()) + "\r"
        return t

    @property
    def text(self) -> str:
        return self.to_er7()

    @property
    def codec(self) -> str:
        """Python codec of the message: the one its bytes were decoded with, else MSH-18's, else UTF-8.

        Pure-ASCII bytes skip the MSH-18 lookup when parsed; it is resolved here when someone asks
        (e.g. to encode the ACK in the sender's charset).
        """
        c = self._codec
        if c is None:
            c = self._codec = python_codec(self.get("MSH-18.1")) or "utf-8"
        return c

    @property
    def warnings(self) -> list[ProcessingWarning]:
        """What reading the message had to guess (the message is still accepted): stored with it, ERR with W."""
        if not self.charset_guessed:
            return []
        return [
            ProcessingWarning(
                f"MSH-18 empty and the bytes are not UTF-8: read as {self.codec}", DATA_TYPE_ERROR, "MSH-18"
            )
        ]

    def encode(self, charset: str | None = None) -> bytes:
        """ER7 bytes in `charset` (default: the codec the message was read with)."""
        return self.to_er7().encode(resolve_charset(charset) if charset else self.codec)

    # -- header shortcuts ----------------------------------------------------------------------
    def _msh(self, f: int) -> str:
        fields = self._first_fields("MSH") or []
        return fields[f] if f < len(fields) else ""

    def _msh_first(self, f: int, c: int = 1) -> str:
        return self.get(compile_path(f"MSH-{f}.{c}"))

    @property
    def message_type(self) -> str:
        code, trig = self._msh_first(9), self._msh_first(9, 2)
        return f"{code}^{trig}" if trig else code

    @property
    def trigger(self) -> str:
        return self._msh_first(9, 2)

    @property
    def structure(self) -> str:
        return self._msh_first(9, 3)

    @property
    def control_id(self) -> str:
        return self.get(compile_path("MSH-10"))

    @property
    def version(self) -> str:
        return self._msh_first(12)

    @property
    def processing_id(self) -> str:
        return self._msh(11)

    @property
    def sending_application(self) -> str:
        return self._msh(3)

    @property
    def sending_facility(self) -> str:
        return self._msh(4)

    @property
    def receiving_application(self) -> str:
        return self._msh(5)

    @property
    def receiving_facility(self) -> str:
        return self._msh(6)

    @property
    def accept_ack_type(self) -> str:
        return self.get(compile_path("MSH-15"))

    @property
    def application_ack_type(self) -> str:
        return self.get(compile_path("MSH-16"))

    @property
    def charset(self) -> str:
        return self.get(compile_path("MSH-18"))

    def __repr__(self) -> str:
        try:
            return f"<Message {self.message_type} {self.control_id!r}>"
        except Exception:  # noqa: BLE001 - repr must never fail
            return "<Message ?>"
