"""The bounds the server protocol enforces on each connection (`[server]` keys), and its own
refusal of a request above `max_concurrency`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import Receive, Scope, Send

from proxy.core.config import ServerConfig
from proxy.core.errors import Overloaded
from proxy.http.writer import send_error

# Where the parser is in the current request.
IDLE, HEAD, BODY = 0, 1, 2
# Seconds a refused connection is still read (and what arrives dropped) after its answer and
# our FIN: closing at once with unread bytes makes the kernel send a reset, which can reach the
# client before the answer and destroy it.
LINGER = 2.0


@dataclass(frozen=True)
class Bounds:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    # Called with a short reason for every refused request (a metrics counter).
    count: Callable[[str], None] | None = None

    @classmethod
    def of(cls, server: ServerConfig, count: Callable[[str], None] | None = None) -> Bounds:
        return cls(
            header_timeout=server.header_timeout,
            body_timeout=server.body_timeout,
            max_header_bytes=server.max_header_bytes,
            max_headers=server.max_headers,
            count=count,
        )


def head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    return len(url) + sum(len(name) + len(value) + 4 for name, value in headers)


async def overloaded(scope: Scope, receive: Receive, send: Send) -> None:
    """The app run for a request above `max_concurrency`: an OpenAI-shaped 503."""
    exc = Overloaded(
        "The server is at its connection limit; retry shortly.",
        headers={"retry-after": "1", "connection": "close"},
    )
    await send_error(send, None, exc)
