"""What vgate's server protocol (proxy.http.protocol) offers its endpoints beyond ASGI.

Two things ASGI cannot say cheaply: "call me if the client goes away" (otherwise a watcher task
per request awaits `receive`), and "this is a whole response" (otherwise uvicorn writes its head
and body with two syscalls and two TCP segments, re-checking every header: proxy.http.direct).
Endpoints find the hooks in the scope and fall back to plain ASGI when another server runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from starlette.types import Scope

SCOPE_KEY = "vgate.connection"


class ConnectionHooks(Protocol):
    def watch_disconnect(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` once if the connection is lost; None stops watching."""

    def cork(self) -> Callable[[], None]:
        """Hold this response's writes until the returned function is called (it must be)."""

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """Write this whole response at once (it adds content-length); False: send it as ASGI
        messages instead."""


def hooks(scope: Scope) -> ConnectionHooks | None:
    found: ConnectionHooks | None = scope.get(SCOPE_KEY)
    return found
