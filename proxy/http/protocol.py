"""uvicorn's httptools protocol with the bounds it lacks (values: proxy.http.bounds).

uvicorn 0.54 bounds neither the size nor the number of request headers, has no timeout for a
head or body that trickles in (nor for a connection that never sends a byte), answers framing
errors with plain text, and lets a protocol upgrade through although its parser then stops
reading. `BoundedHttpProtocol` adds: a head timeout (from the connection's start, or a later
head's first byte) and a body timeout (from the head's end), head size and field limits (431),
an OpenAI-shaped 400 for framing errors llhttp detects and for upgrades, an OpenAI-shaped 503
above `max_concurrency` (exactly above it) and `max_connections_per_client` (proxy.http.limits),
and HTTP/1.0 streams framed by the close (proxy.http.http10). It also offers its endpoints the
hooks of proxy.http.hooks (a disconnect callback, whole responses in one write).

A refused connection gets its answer, then our FIN, and is read until the client closes (at
most LINGER): closing with unread bytes would make the kernel reset it under the answer. A
handler already reading the refused request sees a disconnect, so nothing of it goes upstream;
a request already read whole keeps its answer. Deadlines count from the start of the head or
body, so trickling cannot stretch them. At most one timer per connection, armed only while a
head or body is incomplete after a read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import httptools
from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.core.config import ServerConfig
from proxy.core.errors import (
    HeadersTooLarge,
    MalformedHTTP,
    Overloaded,
    RequestTimeout,
    VgateError,
)
from proxy.http.bounds import BODY, HEAD, IDLE, LINGER, Bounds, head_size, overloaded
from proxy.http.direct import Corked, respond
from proxy.http.hooks import SCOPE_KEY
from proxy.http.http10 import close_framed
from proxy.http.limits import Listener
from proxy.http.writer import raw_response

log = logging.getLogger("vgate.http")


def _nothing() -> None:
    pass


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the reason is in `_refusal`."""


def protocol_class(
    server: ServerConfig, count: Callable[[str], None] | None = None
) -> type[BoundedHttpProtocol]:
    """The protocol class to hand uvicorn (`uvicorn.Config(http=...)`) for these settings;
    one per listener (its connections share its `Listener`)."""
    bounds = Bounds.of(server, count)
    namespace = {"bounds": bounds, "listener": Listener(server.max_connections_per_client)}
    return type("VgateHttpProtocol", (BoundedHttpProtocol,), namespace)


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HttpToolsProtocol with head/body timeouts, head limits and JSON refusals."""

    bounds: ClassVar[Bounds] = Bounds()
    listener: ClassVar[Listener]  # set by protocol_class

    def __init__(
        self,
        config: UvicornConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._stage = IDLE
        self._head_bytes = 0  # bytes read since the current head began (approximate: per read)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_stage = IDLE
        self._refusal: tuple[VgateError, str] | None = None
        self._done = False  # refused: ignore whatever else arrives
        # Called once when the connection is lost (proxy.http.guard): a disconnect reaches the
        # request without a watcher task per request.
        self._on_lost: Callable[[], None] | None = None
        # The concurrency limit is checked here, to answer it with JSON (on_headers_complete).
        self._limit, self.limit_concurrency = self.limit_concurrency, None
        # The address this connection is counted under (server.max_connections_per_client),
        # and whether it is over that limit (its first request is then refused).
        self._client_key: str | None = None
        self._over_client_limit = False

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # The first head's deadline counts from here: a connection that never sends a byte
        # is closed too (uvicorn arms its keep-alive timer only after a response).
        self._arm(HEAD)
        if self.listener.per_client is not None and self.client is not None:
            self._client_key = self.listener.join(self.client[0])
            if self._client_key is None:
                # Answered with a 503 at its first request head (or closed at the head
                # timeout); meanwhile it takes no place in max_concurrency.
                self._over_client_limit = True
                self.connections.discard(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()  # and any lingering close
        if self._client_key is not None:
            self.listener.leave(self._client_key)
            self._client_key = None
        super().connection_lost(exc)
        callback, self._on_lost = self._on_lost, None
        if callback is not None:
            callback()

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._unset_keepalive_if_required()
        if self._stage != BODY:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(MalformedHTTP("Protocol upgrades are not supported."), "upgrade")
            return
        except httptools.HttpParserError as exc:
            refusal = self._refusal
            if refusal is None:
                reason = str(exc) or "invalid framing"
                refusal = (MalformedHTTP(f"Malformed HTTP request: {reason}."), "malformed")
            self._refuse(*refusal)
            return
        stage = self._stage
        if stage == BODY:
            if self._timer_stage != BODY:
                self._arm(BODY)
        elif stage == HEAD:
            if self._head_bytes > self.bounds.max_header_bytes:
                self._refuse(self._too_large(), "headers_too_large")
            elif self._timer_stage != HEAD:
                self._arm(HEAD)
        else:
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                # The common case: the whole request came in this read and is being served.
                if self._timer is not None:
                    self._disarm()
            elif self._timer is None:
                # Bytes that began no request (blank lines) since the last answer: they must
                # not keep an idle connection open forever.
                self._arm(HEAD)

    # -- parser callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._stage = HEAD
        self.scope[SCOPE_KEY] = self  # type: ignore[literal-required]

    # -- proxy.http.hooks.ConnectionHooks --------------------------------------------------------
    def watch_disconnect(self, callback: Callable[[], None] | None) -> None:
        self._on_lost = callback

    def cork(self) -> Callable[[], None]:
        if self.pipeline:
            # A pipelined request is queued: `self.cycle` is that one, not the caller's.
            return _nothing
        cycle = self.cycle
        corked = Corked(self.transport)
        cycle.transport = corked  # type: ignore[assignment]

        def uncork() -> None:
            cycle.transport = self.transport
            corked.flush()

        return uncork

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        if self.pipeline or self.cycle is None:
            # A pipelined request is queued: `self.cycle` is that one, not the caller's.
            return False
        return respond(self.cycle, status, headers, body)

    def on_headers_complete(self) -> None:
        bounds = self.bounds
        if len(self.headers) > bounds.max_headers or (
            # Exact size only when the cheap count says it may be over.
            self._head_bytes > bounds.max_header_bytes
            and head_size(self.url, self.headers) > bounds.max_header_bytes
        ):
            self._refusal = (self._too_large(), "headers_too_large")
            raise _Refused
        if self.parser.should_upgrade():
            # llhttp stops parsing at an upgrade: the body and any later request would be lost.
            self._refusal = (MalformedHTTP("Protocol upgrades are not supported."), "upgrade")
            raise _Refused
        if self._over_client_limit:
            message = "Too many connections from your address; retry shortly."
            busy = Overloaded(message, headers={"retry-after": "1"})
            self._refusal = (busy, "client_connections")
            raise _Refused
        self._stage = BODY
        self._head_bytes = 0
        limit = self._limit
        # "Above the limit": this connection is already among `connections`, while this
        # request's task does not exist yet (uvicorn's own check refuses the limit itself).
        if limit is not None and (
            len(self.connections) > limit or self.listener.requests(self.tasks) >= limit
        ):
            if self.bounds.count is not None:
                self.bounds.count("overloaded")
            app, self.app = self.app, overloaded
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        if self.scope["http_version"] == "1.0":
            close_framed(self.cycle)  # no chunked coding for 1.0: a stream ends by the close

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._stage = IDLE

    def on_response_complete(self) -> None:
        if self._limit is not None:
            self.listener.answered()  # no longer a request in flight, though its task runs on
        super().on_response_complete()

    # -- timers ---------------------------------------------------------------------------
    def _arm(self, stage: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        seconds = self.bounds.header_timeout if stage == HEAD else self.bounds.body_timeout
        self._timer = self.loop.call_later(seconds, self._expire)
        self._timer_stage = stage

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_stage = IDLE

    def _expire(self) -> None:
        stage = self._timer_stage
        self._timer = None
        self._timer_stage = IDLE
        if self.transport.is_closing():
            return
        if self.flow.read_paused:
            # We stopped reading (a pipelined request waits, or the handler has not taken the
            # body yet): the wait is ours, not the client's.
            self._arm(stage)
            return
        if self._stage == IDLE:
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                # Nothing asked: close quietly, as uvicorn's keep-alive timeout does.
                self.transport.close()
            return
        if self._stage == HEAD:
            what, seconds, reason = "headers", self.bounds.header_timeout, "header_timeout"
        else:
            what, seconds, reason = "body", self.bounds.body_timeout, "body_timeout"
        self._refuse(
            RequestTimeout(f"The request {what} did not arrive within {seconds:g} s."), reason
        )

    # -- refusing -------------------------------------------------------------------------
    def _too_large(self) -> HeadersTooLarge:
        b = self.bounds
        return HeadersTooLarge(
            f"Request headers exceed the limit of {b.max_header_bytes} bytes "
            f"or {b.max_headers} fields."
        )

    def _refuse(self, exc: VgateError, reason: str) -> None:
        """Answer `exc` if no answer is under way, and close the connection."""
        self._done = True
        self._disarm()
        if self.bounds.count is not None:
            self.bounds.count(reason)
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        log.info("refused a request from %s: %s (%s)", peer, exc.message, reason)
        cycle = self.cycle
        if cycle is not None and not cycle.more_body and not cycle.response_complete:
            # The request being served (or queued) was read whole before the bad bytes: it
            # keeps its answer, and the connection closes after it.
            cycle.keep_alive = False
            return
        # No answer yet (or the last one is complete): answer. An answer that started or was
        # given early while the body was still coming cannot be followed by another.
        if cycle is None or not cycle.response_started or not cycle.more_body:
            self._write_error(exc)
        self._linger()

    def _linger(self) -> None:
        """Close after a refusal without destroying the answer: our FIN now, the rest of what
        the client sends read and dropped (`_done`) until it closes or LINGER runs out."""
        transport = self.transport
        if transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._timer = self.loop.call_later(LINGER, transport.close)
        self._timer_stage = IDLE

    def _write_error(self, exc: VgateError) -> None:
        if not self.transport.is_closing():
            self.transport.write(raw_response(exc))
