"""The admin listener: `GET /metrics` (and `/health`) on its own loopback port.

It runs on the proxy's event loop, started and stopped by the app's lifespan, so `vgate serve`,
systemd and the tests all get it without a second server object to manage. It is a few dozen
lines of asyncio rather than a second uvicorn server: a second `uvicorn.Server` in one process
would install its own signal handlers over the main one's, and a scraper needs nothing beyond
one GET per connection. Metrics name models, upstreams and keys, so the config refuses a
non-loopback host unless `admin.allow_public` says so (see `proxy.core.config`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from proxy.telemetry.registry import CONTENT_TYPE

log = logging.getLogger("vgate.admin")
_MAX_HEAD = 16 * 1024
_READ_TIMEOUT = 5.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


Render = Callable[[], bytes] | Callable[[], Awaitable[bytes]]


class AdminServer:
    """Serves `render()` at /metrics; `port` is the bound one (config port 0: any free port).
    With `path`, on that unix socket instead (a worker's, read by its supervisor)."""

    def __init__(self, host: str, port: int, render: Render, path: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.path = path
        self._render = render
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.path is not None:
            self._server = await asyncio.start_unix_server(self._handle, self.path, limit=_MAX_HEAD)
            return
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=_MAX_HEAD
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("admin listener on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body = self._answer(head)
            if body is None:  # the metrics: rendered now (by a supervisor, awaited)
                rendered = self._render()
                body = await rendered if inspect.isawaitable(rendered) else rendered
            writer.write(_response(status, content_type, body, head.startswith(b"HEAD ")))
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.LimitOverrunError:
            writer.write(_response(400, "text/plain", b"request head too large\n", False))
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[int, str, bytes | None]:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target not in (b"/metrics", b"/health"):
            return 404, "text/plain", b"not found: try /metrics\n"
        if method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if target == b"/health":
            return 200, "text/plain", b"ok\n"
        return 200, CONTENT_TYPE, None


def _response(status: int, content_type: str, body: bytes, head_only: bool) -> bytes:
    lines = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"content-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return lines.encode() + (b"" if head_only else body)
