"""MLLP framing: <VT> body <FS><CR>, as bytes only (no HL7 knowledge).

Kept apart from the server and client so that it can be tested (and fuzzed) without sockets,
as python-hl7 does. The reader works on one growing buffer with `bytes.find`, never per byte,
because it sits on the hot path of every received message.
"""

from __future__ import annotations

__all__ = [
    "COMMIT_ACK",
    "COMMIT_NAK",
    "DEFAULT_MAX_FRAME",
    "END_BLOCK",
    "START_BLOCK",
    "FrameReader",
    "FrameTooLarge",
    "MLLPError",
    "SkippedFrame",
    "frame",
]

START_BLOCK = b"\x0b"  # VT
END_BLOCK = b"\x1c\x0d"  # FS CR
# MLLP release 2 commit acknowledgement bodies (a handler may return them as the reply).
COMMIT_ACK = b"\x06"
COMMIT_NAK = b"\x15"
DEFAULT_MAX_FRAME = 16 * 2**20

_VT = 0x0B


class MLLPError(Exception):
    """A frame could not be exchanged; `may_have_been_delivered` tells a sender whether to worry.

    False means the peer cannot have received the message (connection refused, connect timeout);
    True means the outcome is unknown (sent, then no answer).
    """

    may_have_been_delivered: bool = False

    def __init__(self, text: str, *, may_have_been_delivered: bool | None = None) -> None:
        super().__init__(text)
        if may_have_been_delivered is not None:
            self.may_have_been_delivered = may_have_been_delivered


class FrameTooLarge(MLLPError):
    """A frame grew past the limit: the stream cannot be trusted any more, so the connection ends.

    `frames` holds the complete frames found before the oversized one in the same feed.
    """

    def __init__(self, size: int, limit: int, frames: list[bytes] | None = None) -> None:
        super().__init__(f"MLLP frame of at least {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit
        self.frames = frames or []


class SkippedFrame(bytes):
    """A complete frame whose body was not kept (the buffer budget was spent): only its head.

    The head (up to the first segment) is enough to build a NAK that names the message;
    `size` is how many body bytes the frame had.
    """

    size: int = 0


def frame(body: bytes) -> bytes:
    """Wrap one body in MLLP control bytes."""
    return b"\x0b" + body + b"\x1c\x0d"


class FrameReader:
    """Incremental MLLP decoder: feed it reads, get back complete frame bodies.

    Bytes outside a frame are discarded and counted in `discarded`. A VT inside a frame restarts
    it (the earlier part was a broken frame: VT may not occur in HL7 content), which lets a
    sender recover without the connection being closed.
    """

    __slots__ = ("max_size", "in_frame", "discarded", "_buf", "_scan", "_skip", "_skipped", "_skip_fs")

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME) -> None:
        self.max_size = max_size
        self.in_frame = False  # a frame has started and not finished
        self.discarded = 0  # bytes dropped because they were outside a frame
        self._buf = bytearray()  # unconsumed input; when in_frame, starts just after the VT
        self._scan = 0  # where to resume looking for FS CR in _buf (everything before is body)
        self._skip: bytes | None = None  # the kept head while the rest of the current frame is dropped
        self._skipped = 0  # body bytes of the skipped frame so far
        self._skip_fs = False  # the last byte seen while skipping was FS (its CR may come next)

    def skip_frame(self, keep: int = 1024) -> None:
        """Stop holding the unfinished frame: keep its first `keep` bytes, drop the rest as it comes.

        When it ends, feed() returns it as a SkippedFrame (so it is still answered, in order).
        """
        if not self.in_frame or self._skip is not None:
            return
        self._skip = bytes(self._buf[:keep])
        self._skipped = len(self._buf)
        self._skip_fs = self._buf[-1:] == b"\x1c"
        self._buf = bytearray()
        self._scan = 0

    def _feed_skip(self, data: bytes) -> tuple[SkippedFrame | None, bytes]:
        """Consume data of a skipped frame: (the frame if it ended, what follows it)."""
        if self._skip_fs and data[:1] == b"\r":  # the FS was the last byte of the previous read
            end, after, size = 0, 1, self._skipped - 1
        else:
            end = data.find(b"\x1c\x0d")
            after, size = end + 2, self._skipped + end
        restart = data.find(b"\x0b", 0, len(data) if end < 0 else end)
        if restart >= 0:  # a new frame before this one ended: it was broken, no answer is due
            self.discarded += self._skipped + restart
            self._skip = None
            self.in_frame = False
            return None, data[restart:]
        if end < 0:
            self._skipped += len(data)
            self._skip_fs = data[-1:] == b"\x1c"
            return None, b""
        done = SkippedFrame(self._skip or b"")
        done.size = size
        self._skip = None
        self.in_frame = False
        return done, data[after:]

    @property
    def pending(self) -> int:
        """Bytes held for an unfinished frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add one read; return the frame bodies it completed, in order."""
        if self._skip is not None:
            done, rest = self._feed_skip(data)
            if not rest:
                return [done] if done is not None else []
            more = self.feed(rest)
            return [done, *more] if done is not None else more
        own = self._buf
        if own:
            own += data
            buf: bytes | bytearray = own
        else:
            buf = data  # fast path: no copy when the previous read ended on a frame boundary
        frames: list[bytes] = []
        size = len(buf)
        pos = 0
        in_frame = self.in_frame
        scan = self._scan
        while True:
            if not in_frame:
                start = buf.find(b"\x0b", pos)
                if start < 0:
                    self.discarded += size - pos
                    pos = size
                    break
                self.discarded += start - pos
                pos = scan = start + 1
                in_frame = True
            end = buf.find(b"\x1c\x0d", scan)
            if end < 0:
                # Body so far; a VT in the new part restarts the frame.
                restart = buf.rfind(b"\x0b", scan, size)
                if restart >= 0:
                    self.discarded += restart - pos
                    pos = restart + 1
                scan = max(pos, size - 1)  # a trailing FS may be completed by the next read
                if size - pos > self.max_size + 1:
                    self._reset()
                    raise FrameTooLarge(size - pos, self.max_size, frames)
                break
            restart = buf.rfind(b"\x0b", scan, end)  # [pos, scan) was checked on earlier reads
            if restart >= 0:
                self.discarded += restart - pos
                pos = restart + 1
            if end - pos > self.max_size:
                self._reset()
                raise FrameTooLarge(end - pos, self.max_size, frames)
            frames.append(bytes(buf[pos:end]))
            pos = scan = end + 2
            in_frame = False
            if pos >= size:
                break
        self.in_frame = in_frame
        if not in_frame:
            pos = size  # nothing outside a frame is worth keeping
        if buf is own:
            if pos:
                del own[:pos]
        elif pos < size:
            own += memoryview(buf)[pos:]
        self._scan = scan - pos if in_frame else 0
        return frames

    def _reset(self) -> None:
        self._buf = bytearray()
        self.in_frame = False
        self._scan = 0
        self._skip = None
