"""The one place responses leave the proxy as bytes: whole answers, errors, stream error events.

An error is a `proxy.core.errors.VgateError` (status, type, code); how it looks depends on the
route family's `errors` shape:

    "openai"     body {"error": {"message", "type", "param", "code"}};
                 after a stream started: `data: {"error": {...}}` (the OpenAI SDK raises on it)
    "responses"  the same body; after a stream started: `event: error` with a typed payload
                 (Responses streams are typed events; the OpenAI SDK raises on `error`)
    "anthropic"  body {"type": "error", "error": {"type", "message"}}; after a stream started:
                 `event: error` with that body (the Anthropic SDK raises on it)

The server protocol (proxy.http.protocol) writes refusals before any ASGI app runs: it takes its
bytes from `raw_response` here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from starlette.types import Send

from proxy.core.api import ErrorShape
from proxy.core.errors import VgateError
from proxy.http.hooks import ConnectionHooks

Header = tuple[bytes, bytes]

# Anthropic's error types by HTTP status (its API reference, "Errors").
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    431: "request_too_large",
    503: "overloaded_error",
}
_REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def error_payload(exc: VgateError, shape: ErrorShape = "openai") -> dict[str, Any]:
    if shape == "anthropic":
        kind = _ANTHROPIC_TYPES.get(exc.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": exc.message}}
    return {
        "error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    }


def error_body(exc: VgateError, shape: ErrorShape = "openai") -> bytes:
    return orjson.dumps(error_payload(exc, shape))


def error_event(exc: VgateError, shape: ErrorShape = "openai") -> bytes:
    """The terminal event of a stream whose headers are already sent (no [DONE] after it)."""
    if shape == "openai":
        return b"data: " + error_body(exc) + b"\n\n"
    if shape == "anthropic":
        return b"event: error\ndata: " + error_body(exc, shape) + b"\n\n"
    payload = {"type": "error", "code": exc.code, "message": exc.message, "param": exc.param}
    return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"


def error_headers(exc: VgateError) -> list[Header]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]


def raw_response(exc: VgateError, *, close: bool = True) -> bytes:
    """A whole HTTP/1.1 error response, for the server protocol's own refusals."""
    body = error_body(exc)
    head = [
        b"HTTP/1.1 %d %s\r\n" % (exc.status, _REASONS.get(exc.status, b"Error")),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
    ]
    if close:
        head.append(b"connection: close\r\n")
    head += [b"%s: %s\r\n" % pair for pair in error_headers(exc)]
    head.append(b"\r\n")
    return b"".join(head) + body


async def send_whole(
    send: Send,
    conn: ConnectionHooks | None,
    status: int,
    headers: list[Header],
    body: bytes,
) -> None:
    """A whole response, head and body in one write when the server offers it (proxy.http.hooks)."""
    if conn is not None and conn.respond(status, headers, body):
        return
    headers.append((b"content-length", str(len(body)).encode()))
    uncork = conn.cork() if conn is not None else None
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    finally:
        if uncork is not None:
            uncork()


async def send_error(
    send: Send,
    conn: ConnectionHooks | None,
    exc: VgateError,
    shape: ErrorShape = "openai",
    extra: Sequence[Header] = (),
) -> None:
    headers = [(b"content-type", b"application/json"), *extra, *error_headers(exc)]
    await send_whole(send, conn, exc.status, headers, error_body(exc, shape))
