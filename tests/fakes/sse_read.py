"""Reading SSE bodies back in tests: typed events (`event:` + `data:`) and plain `data:` ones."""

from __future__ import annotations

from typing import Any

import orjson


def typed_events(body: bytes) -> list[tuple[str, Any]]:
    """(event name, parsed data) of each event of a typed stream, in order; every event must have
    exactly one `event:` and one `data:` line."""
    out = []
    for block in body.split(b"\n\n"):
        if not block:
            continue
        lines = block.split(b"\n")
        assert len(lines) == 2, block
        name, data = lines
        assert name.startswith(b"event: ") and data.startswith(b"data: "), block
        out.append((name[len(b"event: ") :].decode(), orjson.loads(data[len(b"data: ") :])))
    return out


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys (in order) and value types, not the values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__
