"""Reading and checking a request body before anything goes upstream."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.types import Receive

from proxy.core.errors import InvalidRequest, PayloadTooLarge


class ClientGone(Exception):
    """The client disconnected before its body was complete: nothing to answer."""


async def read_body(receive: Receive, headers: Headers, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def parse_json_object(body: bytes) -> dict[str, Any]:
    # orjson refuses NaN/Infinity, nesting deeper than 1024 and integers beyond 64 bits: exactly
    # the inputs that should never reach an engine.
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("Request body must be a JSON object.")
    return data


def check_completion_request(
    route: str, data: dict[str, Any], *, max_n: int, max_messages: int
) -> tuple[str, bool]:
    """Check the fields the proxy relies on; returns (model, stream). Extras pass untouched."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter", param="model")
    if route == "chat/completions":
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty array", param="messages")
        if len(messages) > max_messages:
            raise InvalidRequest(
                f"'messages' has {len(messages)} items; the limit is {max_messages}",
                param="messages",
            )
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidRequest(
                    f"messages[{i}] must be an object with a 'role'", param=f"messages.[{i}]"
                )
    else:
        prompt = data.get("prompt")
        if not isinstance(prompt, str | list) or (isinstance(prompt, list) and not prompt):
            raise InvalidRequest("'prompt' must be a string or a non-empty array", param="prompt")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    for name in ("max_tokens", "max_completion_tokens"):
        value = data.get(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise InvalidRequest(f"'{name}' must be a positive integer", param=name)
    n = data.get("n")
    if n is not None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InvalidRequest("'n' must be a positive integer", param="n")
        if n > max_n:
            raise InvalidRequest(f"'n' is {n}; this server allows at most {max_n}", param="n")
    return model, stream
