"""Checks of request fields shared by the families: each names the field it refuses."""

from __future__ import annotations

from typing import Any

from proxy.core.api import Constraint
from proxy.core.errors import InvalidRequest


def model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter", param="model")
    return model


def stream_of(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    return stream


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise InvalidRequest(f"'{name}' must be a positive integer", param=name)
    return int(value)


def bounded_int(body: dict[str, Any], name: str, limit: int) -> int | None:
    """A positive integer at most `limit` (a multiplier of the work a request asks for)."""
    value = positive_int(body, name)
    if value is not None and value > limit:
        raise InvalidRequest(f"'{name}' is {value}; this server allows at most {limit}", param=name)
    return value


def bounded_list(value: Any, name: str, limit: int, *, empty: bool = False) -> list[Any]:
    """`value` as a list of at most `limit` items (and at least one unless `empty`)."""
    if not isinstance(value, list) or (not value and not empty):
        what = "an array" if empty else "a non-empty array"
        raise InvalidRequest(f"'{name}' must be {what}", param=name)
    if len(value) > limit:
        raise InvalidRequest(f"'{name}' has {len(value)} items; the limit is {limit}", param=name)
    return value


def optional_list(body: dict[str, Any], name: str, limit: int) -> list[Any] | None:
    value = body.get(name)
    if value is None:
        return None
    return bounded_list(value, name, limit, empty=True)


def output_tokens(body: dict[str, Any], *names: str) -> int | None:
    """The first of `names` that is set (an output budget), as the engine would read it."""
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def fixed_sampling(body: dict[str, Any]) -> bool:
    """Whether the request fixes its own answer: greedy (`temperature` 0 or `top_k` 1) or a
    `seed` (vLLM draws a seeded request's sample from its own generator). Without any of them
    the engine samples, with the model's defaults: the next answer would differ."""
    temperature = body.get("temperature")
    if type(temperature) in (int, float) and temperature == 0:
        return True
    top_k = body.get("top_k")
    return (type(top_k) is int and top_k == 1) or type(body.get("seed")) is int


_JSON_TYPES = ("json_schema", "json_object")


def constraints(tools: Any, *formats: Any, structured: Any = None) -> tuple[Constraint, ...]:
    """`Api.constraints` from a family's fields: its tool list, its response format objects
    (`{"type": "json_schema" | "json_object", ...}`), and vLLM's `structured_outputs` (JSON
    when it holds `json` or `json_object`)."""
    found: list[Constraint] = []
    if isinstance(tools, list) and tools:
        found.append("tools")
    json = any(isinstance(f, dict) and f.get("type") in _JSON_TYPES for f in formats)
    if not json and isinstance(structured, dict):
        json = structured.get("json") is not None or bool(structured.get("json_object"))
    if json:
        found.append("json")
    return tuple(found)
