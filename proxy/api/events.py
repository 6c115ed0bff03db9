"""Typed SSE events (`event: NAME` then `data: {...}`), as Responses and Anthropic streams send
them: finding one in a block of whole events, and reading its data."""

from __future__ import annotations

import re
from typing import Any

import orjson

_BOUNDARIES = (b"\n\n", b"\r\n\r\n", b"\r\r")
# The top-level usage object of an answer, with objects nested one level (its `*_details`).
_USAGE_VALUE = re.compile(rb'"usage"\s*:\s*(\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})')


def event_data(block: bytes, name: bytes) -> Any:
    """The parsed data of the last event `name` in `block` (None if absent or not JSON)."""
    at = block.rfind(b"event: " + name)
    if at < 0:
        at = block.rfind(b"event:" + name)
        if at < 0:
            return None
    start = block.find(b"data:", at)
    if start < 0:
        return None
    ends = [i for sep in _BOUNDARIES if (i := block.find(sep, start)) >= 0]
    data = block[start + 5 : min(ends) if ends else len(block)]
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def usage_object(body: bytes) -> dict[str, Any] | None:
    """The last top-level `usage` object of a JSON answer (vLLM writes it after the output;
    a `"usage"` inside generated text is escaped, so it cannot match)."""
    matches = _USAGE_VALUE.findall(body)
    for match in reversed(matches):
        try:
            value = orjson.loads(match)
        except orjson.JSONDecodeError:
            continue
        if type(value) is dict:
            return value
    return None


def count(data: Any, name: str) -> int | None:
    value = data.get(name) if type(data) is dict else None
    return value if type(value) is int else None
