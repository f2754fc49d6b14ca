"""FrameReader: bytes in any chunking give back exactly the frames that were sent."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.hl7.mllp import COMMIT_ACK, COMMIT_NAK, FrameReader, FrameTooLarge, frame
from engine.hl7.mllp_framing import SkippedFrame

MSG = b"MSH|^~\\&|RIS|H|ENG|H|20250101||ORM^O01|1|P|2.5\rPID|||123\r"


def feed_all(reader: FrameReader, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(reader.feed(chunk))
    return out


def test_one_frame_in_one_read() -> None:
    reader = FrameReader()
    assert reader.feed(frame(MSG)) == [MSG]
    assert not reader.in_frame
    assert reader.pending == 0


def test_frame_split_byte_by_byte() -> None:
    reader = FrameReader()
    data = frame(MSG)
    out = feed_all(reader, [data[i : i + 1] for i in range(len(data))])
    assert out == [MSG]
    assert not reader.in_frame


def test_split_between_fs_and_cr() -> None:
    reader = FrameReader()
    data = frame(MSG)
    assert reader.feed(data[:-1]) == []
    assert reader.in_frame
    assert reader.feed(data[-1:]) == [MSG]


def test_many_frames_in_one_read_keep_order() -> None:
    bodies = [MSG.replace(b"|1|", f"|{i}|".encode()) for i in range(5)]
    reader = FrameReader()
    assert reader.feed(b"".join(frame(b) for b in bodies)) == bodies


def test_bytes_outside_frames_are_discarded_and_counted() -> None:
    reader = FrameReader()
    out = reader.feed(b"junk" + frame(b"A") + b"\r\n" + frame(b"B") + b"xyz")
    assert out == [b"A", b"B"]
    assert reader.discarded == 4 + 2 + 3
    assert not reader.in_frame


def test_fs_without_cr_is_body() -> None:
    reader = FrameReader()
    assert reader.feed(b"\x0bA\x1cB\x1c\r") == [b"A\x1cB"]


def test_vt_inside_frame_restarts_it() -> None:
    reader = FrameReader()
    assert reader.feed(b"\x0bbroken") == []
    assert reader.feed(b"\x0bGOOD\x1c\r") == [b"GOOD"]
    assert reader.discarded == len(b"broken")


def test_empty_frame_and_commit_acks() -> None:
    reader = FrameReader()
    assert reader.feed(frame(b"") + frame(COMMIT_ACK) + frame(COMMIT_NAK)) == [b"", b"\x06", b"\x15"]


def test_frame_at_limit_is_accepted_and_over_limit_raises() -> None:
    reader = FrameReader(max_size=10)
    assert reader.feed(frame(b"x" * 10)) == [b"x" * 10]
    with pytest.raises(FrameTooLarge) as info:
        reader.feed(frame(b"ok") + frame(b"y" * 11))
    assert info.value.frames == [b"ok"]
    assert info.value.limit == 10


def test_unfinished_frame_over_limit_raises_before_end_arrives() -> None:
    reader = FrameReader(max_size=100)
    reader.feed(b"\x0b" + b"z" * 60)
    with pytest.raises(FrameTooLarge):
        reader.feed(b"z" * 60)
    # the reader is usable again afterwards (the server closes anyway)
    assert reader.feed(frame(b"next")) == [b"next"]


def test_large_frame_in_many_chunks() -> None:
    body = bytes(range(32, 127)) * 20_000
    data = frame(body)
    reader = FrameReader()
    out = feed_all(reader, [data[i : i + 65536] for i in range(0, len(data), 65536)])
    assert out == [body]


body_bytes = st.binary(max_size=200).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))


@settings(max_examples=300, deadline=None)
@given(
    bodies=st.lists(body_bytes, max_size=8),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
    junk=st.binary(max_size=5).map(lambda b: b.replace(b"\x0b", b"")),
)
def test_any_chunking_yields_exactly_the_frames(bodies: list[bytes], cuts: list[int], junk: bytes) -> None:
    stream = junk + b"".join(frame(b) + junk for b in bodies)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    reader = FrameReader()
    assert feed_all(reader, chunks) == bodies
    assert not reader.in_frame


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    head=st.binary(min_size=1, max_size=50).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b"") or b"M"),
    tail=body_bytes,
    after=st.lists(body_bytes, max_size=3),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_a_skipped_frame_ends_where_it_would_have_and_the_next_ones_are_intact(
    head: bytes, tail: bytes, after: list[bytes], cuts: list[int]
) -> None:
    """skip_frame() (the buffer budget is spent) keeps a head, drops the rest, and stays in step."""
    reader = FrameReader()
    assert reader.feed(b"\x0b" + head) == []
    reader.skip_frame(keep=8)
    assert reader.pending == 0 and reader.in_frame
    stream = tail + b"\x1c\r" + b"".join(frame(b) for b in after)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    out = feed_all(reader, chunks)
    assert isinstance(out[0], SkippedFrame) and out[0] == head[:8] and out[0].size == len(head) + len(tail)
    assert out[1:] == after
    assert not reader.in_frame and reader.pending == 0


def test_a_vt_while_skipping_drops_the_broken_frame_unanswered() -> None:
    reader = FrameReader()
    reader.feed(b"\x0bMSH|broken")
    reader.skip_frame()
    assert reader.feed(b"more\x0bnext\x1c\r") == [b"next"]
    assert reader.feed(b"\x0bAB\x1c") == [] and reader.feed(b"\r") == [b"AB"]
