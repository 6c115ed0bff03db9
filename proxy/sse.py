"""Server-sent events, handled at event granularity without parsing what nobody needs.

The upstream's bytes are relayed as they arrive, cut only at event boundaries so a policy never
sees half an event (upstreams split events anywhere: inside UTF-8, between `\\r` and `\\n`). Only
the usage event (`"choices":[]` plus `"usage"`, just before `[DONE]`) is ever decoded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from proxy.pipeline import ProxyRequest

_BOUNDARIES = (b"\n\n", b"\r\n\r\n", b"\r\r")
_USAGE_MARK = b'"usage"'
_EMPTY_CHOICES = b'"choices":[]'


def _last_boundary(buf: bytes) -> int:
    """Index just past the last complete event in `buf`, or 0."""
    end = 0
    for sep in _BOUNDARIES:
        i = buf.rfind(sep)
        if i >= 0:
            end = max(end, i + len(sep))
    return end


def _split_events(block: bytes) -> list[bytes]:
    """Complete events of `block` (which ends at a boundary), each with its terminator."""
    events = []
    start = 0
    n = len(block)
    while start < n:
        best = -1
        size = 0
        for sep in _BOUNDARIES:
            i = block.find(sep, start)
            if i >= 0 and (best < 0 or i < best):
                best, size = i, len(sep)
        if best < 0:
            events.append(block[start:])
            break
        events.append(block[start : best + size])
        start = best + size
    return events


def _event_data(event: bytes) -> bytes:
    data = event.strip()
    return data[5:].lstrip() if data.startswith(b"data:") else b""


class UsageTap:
    """Relays an SSE byte stream by whole events and captures the final usage event.

    The usage object lands in `request.usage`, for policies that wrap the stream further out.
    With `strip`, the usage-only event is dropped: the proxy asked the upstream for usage
    although the client did not.
    """

    def __init__(self, stream: AsyncIterator[bytes], request: ProxyRequest, *, strip: bool) -> None:
        self._stream = stream
        self._request = request
        self._strip = strip

    async def __aiter__(self) -> AsyncIterator[bytes]:
        pending = b""
        try:
            async for chunk in self._stream:
                buf = pending + chunk if pending else chunk
                cut = _last_boundary(buf)
                if cut == 0:
                    pending = buf
                    continue
                complete, pending = buf[:cut], buf[cut:]
                if _USAGE_MARK in complete:
                    complete = self._take_usage(complete)
                if complete:
                    yield complete
            if pending:
                yield pending
        finally:
            aclose = getattr(self._stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def _take_usage(self, block: bytes) -> bytes:
        kept = []
        for event in _split_events(block):
            if _USAGE_MARK in event and _EMPTY_CHOICES in event.replace(b" ", b""):
                try:
                    payload = orjson.loads(_event_data(event))
                except orjson.JSONDecodeError:
                    payload = None
                if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                    self._request.usage = payload["usage"]
                    if self._strip:
                        continue
            kept.append(event)
        return b"".join(kept)


def usage_of(body: bytes) -> dict[str, Any] | None:
    """The `usage` object of a whole (non-streaming) completion body, if any."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    usage = payload.get("usage") if isinstance(payload, dict) else None
    return usage if isinstance(usage, dict) else None
