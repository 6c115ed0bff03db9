"""Server-sent events cut at event boundaries, at a cost linear in the bytes, with bounded memory.

Upstreams split events anywhere (inside UTF-8, between `\\r` and `\\n`); the relay hands the
route family only whole events, so it never sees half of a usage event or of a terminator. Each
chunk is searched once for the last boundary (plus the few bytes before it, where a boundary
may straddle two chunks); an unfinished event is kept as a list of chunks and joined once, when
it completes. So a 40 MB event costs one pass over 40 MB, not one per chunk, and one stream holds
at most `limit` bytes of an unfinished event: beyond that the stream is broken off.
"""

from __future__ import annotations

from proxy.core.errors import UpstreamStreamBroken

_BOUNDARIES = (b"\n\n", b"\r\n\r\n", b"\r\r")
# A boundary is at most 4 bytes: at most 3 of them can sit at the end of the previous chunk.
_STRADDLE = 3


class EventTooLarge(UpstreamStreamBroken):
    """One event of the upstream's stream grew beyond the bound the proxy holds."""


def last_boundary(buf: bytes, start: int = 0) -> int:
    """Index just past the last complete event in `buf[start:]`, or 0 when there is none."""
    end = 0
    for sep in _BOUNDARIES:
        i = buf.rfind(sep, start)
        if i >= 0 and i + len(sep) > end:
            end = i + len(sep)
    return end


class Framer:
    """Feeds chunks, returns whole events; holds the unfinished rest (at most `limit` bytes)."""

    __slots__ = ("_limit", "_pending", "_size")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._pending: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> bytes:
        """The complete events that `chunk` finishes (b"" when it finishes none)."""
        if not self._pending:
            if chunk.endswith(b"\n\n"):
                return chunk  # whole events (an engine writes one or more at a time): no search
            cut = last_boundary(chunk)
            if cut == len(chunk):
                return chunk  # the common case: a chunk of whole events, passed as it is
            if cut:
                self._pending.append(chunk[cut:])
                self._size = len(chunk) - cut
                return chunk[:cut]
            self._hold(chunk)
            return b""
        tail = self._pending[-1][-_STRADDLE:]
        joined = tail + chunk[: 4 + _STRADDLE]
        cut = last_boundary(chunk)
        if not cut:
            # Only a boundary straddling the two chunks is left to look for.
            near = last_boundary(joined)
            cut = near - len(tail) if near > len(tail) else 0
        if not cut:
            self._hold(chunk)
            return b""
        self._pending.append(chunk[:cut])
        block = b"".join(self._pending)
        rest = chunk[cut:]
        self._pending = [rest] if rest else []
        self._size = len(rest)
        return block

    def rest(self) -> bytes:
        """What is left at the end of the stream (an unfinished event), and forget it."""
        block = b"".join(self._pending)
        self._pending = []
        self._size = 0
        return block

    def _hold(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self._size += len(chunk)
        if self._size > self._limit:
            self._pending = []
            raise EventTooLarge(
                f"An event of the upstream's stream exceeded {self._limit} bytes; "
                "the stream was stopped."
            )
