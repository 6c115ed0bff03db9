"""Writing a whole response as one piece: what the server protocol offers its endpoints.

uvicorn writes the head and the body of a response with two syscalls (two TCP segments), and
its `send` re-validates and re-frames every header. A whole answer from an endpoint is headers
the proxy built and a body of known length, so `respond` writes it directly, in one write, and
completes the request cycle the way uvicorn's own `send` does (keep-alive, the next pipelined
request). Whatever it does not cover (a HEAD request, a pipelined request waiting, an access
log, a paused writer) falls back to ASGI messages, joined into one write by `Corked`.

It reads and sets internals of uvicorn's request cycle; tests/proxy/test_uvicorn_internals.py
fails by name if they change, and uvicorn is pinned to the range checked.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

Header = tuple[bytes, bytes]


class Corked:
    """A transport stand-in for one response: writes are joined and go out as one."""

    __slots__ = ("_parts", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._parts.append(data)

    def flush(self) -> None:
        if self._parts:
            data = b"".join(self._parts)
            self._parts.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


def respond(cycle: Any, status: int, headers: list[Header], body: bytes) -> bool:
    """Write a whole response for `cycle` in one write; False if the ASGI path must do it.

    `headers` are the proxy's own (names lower case, values from a parser that refused line
    breaks): they are not re-checked; content-length and connection are added here.
    """
    if (
        cycle.response_started
        or cycle.disconnected
        or cycle.access_log
        or cycle.flow.write_paused
        or cycle.scope["method"] == "HEAD"
        or status not in STATUS_LINE
    ):
        return False
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    parts = [STATUS_LINE[status]]
    if cycle.default_headers:
        parts += [b"%s: %s\r\n" % pair for pair in cycle.default_headers]
    parts += [b"%s: %s\r\n" % pair for pair in headers]
    parts.append(b"content-length: %d\r\n" % len(body))
    if not cycle.keep_alive:
        parts.append(b"connection: close\r\n")
    parts += (b"\r\n", body)
    transport = cycle.transport
    transport.write(b"".join(parts))
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        transport.close()
    cycle.on_response()
    return True
