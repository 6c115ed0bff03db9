"""Server-sent events, handled at event granularity without parsing what nobody needs.

The upstream's bytes are relayed as they arrive, cut only at event boundaries so a policy never
sees half an event (upstreams split events anywhere: inside UTF-8, between `\\r` and `\\n`). Only
the usage event (`"choices":[]` plus `"usage"`, just before `[DONE]`) is ever decoded.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import orjson

from proxy.core.pipeline import ProxyRequest

_BOUNDARIES = (b"\n\n", b"\r\n\r\n", b"\r\r")
# A usage *object* (not `"usage": null`): found by one C-level scan per block.
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_EMPTY_CHOICES = b'"choices":[]'


def _last_boundary(buf: bytes) -> int:
    """Index just past the last complete event in `buf`, or 0."""
    end = 0
    for sep in _BOUNDARIES:
        i = buf.rfind(sep)
        if i >= 0:
            end = max(end, i + len(sep))
    return end


def _event_around(block: bytes, at: int) -> tuple[int, int]:
    """The bounds of the event containing index `at` of `block` (which ends at a boundary)."""
    start, end = 0, len(block)
    for sep in _BOUNDARIES:
        i = block.rfind(sep, 0, at)
        if i >= 0:
            start = max(start, i + len(sep))
        j = block.find(sep, at)
        if j >= 0:
            end = min(end, j + len(sep))
    return start, end


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
                if b'"usage"' in complete:
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
        # Linear in the block whatever its size (a slow reader can batch a whole stream): only
        # the events around a usage object are looked at, the last one first.
        for match in reversed(list(_USAGE_OBJECT.finditer(block))):
            start, end = _event_around(block, match.start())
            event = block[start:end]
            if _EMPTY_CHOICES not in event.replace(b" ", b""):
                continue  # per-chunk usage stats on a token event: not the final usage
            try:
                payload = orjson.loads(_event_data(event))
            except orjson.JSONDecodeError:
                continue
            if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                self._request.usage = payload["usage"]
                if self._strip:
                    return block[:start] + block[end:]
                return block
        return block


# The usage object with at most one level of nesting (`prompt_tokens_details`): parsing it
# alone is a fraction of parsing a whole completion.
_USAGE_VALUE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})')


def usage_of(body: bytes) -> dict[str, Any] | None:
    """The `usage` object of a whole (non-streaming) completion body, if any.

    The last match is the top-level one: vLLM writes `usage` after `choices`, and a `"usage"`
    inside generated text is escaped (`\\"usage\\"`), so it cannot match.
    """
    matches = _USAGE_VALUE.findall(body)
    if matches:
        try:
            usage = orjson.loads(matches[-1])
        except orjson.JSONDecodeError:
            usage = None
        if isinstance(usage, dict):
            return usage
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    found = payload.get("usage") if isinstance(payload, dict) else None
    return found if isinstance(found, dict) else None
