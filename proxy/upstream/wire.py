"""vgate's HTTP/1.1 client for the hot path: a keep-alive pool of asyncio protocols, httptools.

Why our own: on one core at 16 concurrent requests, aiohttp's client machinery (request and
response models, payload writers, stream readers, timers, tracing hooks) was a third of the
proxy's CPU per request (py-spy, bench/README.md); httpx's own pool costs several times more.
A proxy to a known engine needs a small subset of HTTP/1.1: POST with a Content-Length body, a
response framed by Content-Length, chunked encoding or EOF, keep-alive. The parsing is
httptools (llhttp, the parser uvicorn serves with); this module only moves bytes and state.

A connection goes back to the pool only if its bytes were exactly one response to the request
it carried: anything after that response's end (a byte in the same read, a byte while idle) or
an answer that came while the request was still being written retires it.

It speaks the httpx subset of `proxy.upstream.client.UpstreamClient`, so respx-driven tests can
put a real `httpx.AsyncClient` in its place.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

from proxy.core.transport import (
    ConnectFailed,
    ConnectionClosed,
    ConnectTimedOut,
    PoolExhausted,
    ProtocolViolation,
    TransportError,
)

# A streamed response whose reader (the client of the proxy) falls behind stops reading the
# upstream socket at the high-water mark: a slow client costs at most this much memory, and the
# engine's own flow control takes over.
_HIGH_WATER = 256 * 1024
# Bodies above this go out as two buffers instead of one concatenated copy.
_CONCAT_MAX = 64 * 1024
_CR, _LF = 13, 10
# Bytes a response may send without a body byte among them: its head, interim responses, chunk
# framing, trailers. vLLM's heads are a few hundred bytes; llhttp passes header lines to
# httptools, which buffers each whole, so a head that never ends must be cut off somewhere.
_MAX_BARE = 64 * 1024
_VERSIONS = ("1.1", "1.0")
_HTTP = b"HTTP/"


# The kernel's transport errors under the names this module has always used: what the wire
# client raises is what `proxy.core.transport.upstream_errors` maps.
WireError = TransportError
WireConnectError = ConnectFailed
WireConnectTimeout = ConnectTimedOut
WireProtocolError = ProtocolViolation
WireClosed = ConnectionClosed
# Every connection the pool may open stayed busy for the connect timeout: the proxy's own
# limit (`upstream.max_connections`), not a failure of the upstream.
WirePoolFull = PoolExhausted


class WireRequest:
    __slots__ = ("content", "head", "pool")

    def __init__(self, pool: _Pool, head: bytes, content: bytes) -> None:
        self.pool = pool
        self.head = head
        self.content = content


class WireResponse:
    """One response: its head, then its body as it arrives (the httpx names the forwarder uses).

    Iterating it yields everything buffered so far as one chunk: one write to the client per
    wake-up, however many network reads filled it.
    """

    __slots__ = (
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_headers",
        "_raw_headers",
        "_size",
        "_waiter",
        "status_code",
    )

    def __init__(self, conn: _Conn) -> None:
        self._conn: _Conn | None = conn
        self.status_code = 0
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._headers: dict[str, str] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._done = False
        self._error: WireError | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def content_type(self) -> str:
        """The response's content-type (what the proxy relays), without decoding every header:
        read for every answer, while `headers` is for the rare caller that wants them all."""
        for name, value in self._raw_headers:
            if len(name) == 12 and name.lower() == b"content-type":
                return value.decode("latin-1")
        return "application/json"

    @property
    def content_encoding(self) -> str | None:
        """The response's content-encoding, if any (the proxy asked for identity)."""
        for name, value in self._raw_headers:
            if len(name) == 16 and name.lower() == b"content-encoding":
                return value.decode("latin-1")
        return None

    @property
    def headers(self) -> Mapping[str, str]:
        if self._headers is None:
            headers: dict[str, str] = {}
            for name, value in self._raw_headers:
                key = name.decode("latin-1").lower()
                text = value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
            self._headers = headers
        return self._headers

    # -- the reader's side ----------------------------------------------------------------

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    async def _head(self) -> None:
        while not self.status_code:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def aread(self) -> bytes:
        while not self._done:
            if self._error is not None:
                raise self._error
            conn = self._conn
            if conn is not None and conn.paused:
                conn.resume()  # the whole body is wanted: the high-water mark is for streams
            await self._wait()
        body = b"".join(self._chunks)
        self._chunks.clear()
        return body

    def aiter_raw(self) -> WireResponse:
        return self

    def __aiter__(self) -> WireResponse:
        return self

    async def __anext__(self) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            await self._wait()
        chunks = self._chunks
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()
        return chunk

    async def aclose(self) -> None:
        # An unfinished response closes its connection: that close is what makes vLLM abort
        # the generation. A finished one went back to the pool when its last byte arrived.
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.abandon()

    # -- the connection's side ------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._conn = None
        self._wake()

    def _fail(self, error: WireError) -> None:
        if not self._done:
            self._error = error
            self._conn = None
            self._wake()


class _Conn(asyncio.Protocol):
    __slots__ = (
        "_bare",
        "_big",
        "_chunked",
        "_ended",
        "_extra",
        "_heads",
        "_keep",
        "_parser",
        "_pool",
        "_start",
        "_transport",
        "closed",
        "idle_since",
        "in_use",
        "paused",
        "received",
        "response",
        "reused",
    )

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.response: WireResponse | None = None
        self.closed = False
        self.paused = False
        self.in_use = False  # checked out of the pool (the pool counts these)
        self.reused = False  # taken from the idle list at least once
        self.received = False  # any byte of the current response arrived
        self.idle_since = 0.0
        # Set by the parser's callbacks during one data_received: the awaited response ended
        # (and whether it allows keep-alive), and bytes came after its end.
        self._ended = False
        self._keep = False
        self._extra = False
        self._chunked = False  # the current response's framing (known once its head is)
        self._start = b""  # the current response's first bytes, until they read "HTTP/"
        self._bare = 0  # its bytes since the last body byte (bounded by _MAX_BARE)
        # The read being parsed, if it may hold whole heads over that bound, and the interim
        # heads that ended in it.
        self._big: bytes | None = None
        self._heads = 0

    # -- used by the pool and the response ------------------------------------------------

    def start(self, head: bytes, content: bytes) -> WireResponse:
        response = WireResponse(self)
        transport = self._transport
        if self.closed or transport is None:
            response._fail(WireClosed("connection closed before the request was sent"))
            return response
        self.response = response
        self.received = False
        self._start = b""
        self._bare = 0
        if len(content) <= _CONCAT_MAX:
            transport.write(head + content)
        else:
            transport.writelines((head, content))
        return response

    def pause(self) -> None:
        if not self.paused and self._transport is not None:
            self.paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self._transport is not None and not self.closed:
            self.paused = False
            self._transport.resume_reading()

    def abandon(self) -> None:
        self.response = None
        self.close()

    def close(self, *, abort: bool = False) -> None:
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                if abort:
                    # No graceful end (a TLS close_notify needs more loop turns than a
                    # client being closed has: uvloop refuses to close a loop mid-shutdown).
                    self._transport.abort()
                else:
                    self._transport.close()
            self._pool.discard(self)

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            # Bytes nobody asked for (no request in flight): the connection is out of step.
            self.close()
            return
        self.received = True
        if len(self._start) < 5 and not self._sniff(data):
            self._violated("the upstream did not answer in HTTP")
            return
        self._ended = self._extra = False
        # This read may hold heads over the bound whole: on_headers_complete measures them.
        big = self._bare + len(data) > _MAX_BARE
        self._big = data if big else None
        self._heads = 0
        size = response._size
        parser = self._parser
        try:
            if data[-1] in (_CR, _LF) and self._may_end_in_line_breaks(data):
                # llhttp skips CR/LF after a message without a callback: the last byte goes in
                # alone, so a response that ended before it is known to have had bytes after it.
                view = memoryview(data)
                parser.feed_data(view[:-1])
                if self._ended:
                    self._extra = True
                else:
                    parser.feed_data(view[-1:])
            else:
                parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # A violation our callbacks found travels as the exception's context.
            found = exc.__context__
            self._violated(found.args[0] if isinstance(found, WireProtocolError) else str(exc))
            return
        except httptools.HttpParserUpgrade:
            self._violated("the upstream switched protocols unasked")
            return
        if big:
            self._big = None  # not kept past its read
        if self._ended:
            self._settle()
        elif response._size == size:
            self._bare += len(data)
            if self._bare > _MAX_BARE:
                self._violated(f"over {_MAX_BARE} bytes of head or framing without a body byte")
        else:
            self._bare = 0

    def _sniff(self, data: bytes) -> bool:
        """Whether the response's first bytes can begin "HTTP/" (llhttp also reads RTSP/ and
        ICE/ messages); they are kept until five are known."""
        if not self._start and data.startswith(_HTTP):
            self._start = _HTTP
            return True
        start = self._start + (data if self._start else data.lstrip(b"\r\n"))
        self._start = start[:5]
        return _HTTP.startswith(self._start)

    def _violated(self, what: str) -> None:
        self._lost(WireProtocolError(f"malformed response: {what}"))
        self.close()

    def _may_end_in_line_breaks(self, data: bytes) -> bool:
        """Whether `data` (ending in CR or LF) may hold the response's end and CR/LF after it."""
        response = self.response
        if response is None or not response.status_code or not self._chunked:
            return True
        # A chunked response ends in CRLF CRLF after a byte that is neither: CR/LF after that
        # makes the last five bytes line breaks (an SSE read ends in "\n\n\r\n" after text).
        return len(data) < 5 or data[-5] in (_CR, _LF)

    def _settle(self) -> None:
        """The awaited response ended in this read: pool the connection only if it is in step."""
        transport = self._transport
        if (
            self._extra
            or not self._keep
            or self.closed
            or transport is None
            # Answered while the request was still being written: what the upstream made of
            # the rest of it is unknown.
            or transport.get_write_buffer_size()
        ):
            self.close()
            return
        self.resume()
        self._pool.release(self)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        response = self.response
        if exc is None and response is not None and response.status_code and _until_eof(response):
            # Framed by the connection's end (neither Content-Length nor chunked).
            self.response = None
            response._finish()
        else:
            reason = f": {exc}" if exc else ""
            self._lost(WireClosed(f"connection closed before the response ended{reason}"))
        self.close()  # our bookkeeping; closing the lost transport again is a no-op

    def _lost(self, error: WireError) -> None:
        response = self.response
        if response is not None:
            self.response = None
            response._fail(error)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.response is None:
            # A message after the awaited response ended: nobody asked for it.
            self._extra = True

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        # After the head, header lines are trailers: read (and bounded), not kept.
        if response is not None and not response.status_code:
            response._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            return
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                raise WireProtocolError("the upstream switched protocols (101) unasked")
            return  # interim (100, 103, ...): its headers are dropped at its end
        if self._big is not None and self._bare + _heads_end(self._big, self._heads) > _MAX_BARE:
            raise WireProtocolError(f"over {_MAX_BARE} bytes of head")
        version = parser.get_http_version()
        if version not in _VERSIONS:
            raise WireProtocolError(f"HTTP/{version} is not HTTP/1.x")
        coding = response.headers.get("transfer-encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            # llhttp frames "gzip, chunked" as chunked and "gzip" by the connection's end: the
            # body would reach the client still transfer-coded.
            raise WireProtocolError(f"transfer-encoding {coding!r} is not chunked")
        self._chunked = coding is not None
        response.status_code = status
        response._wake()

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None:
            return
        if not response.status_code:
            # An interim response (100 Continue, 103 Early Hints): the real one follows.
            self._heads += 1
            response._raw_headers.clear()
            response._headers = None
            return
        # Whether the connection goes back to the pool is settled once the read is parsed.
        self.response = None
        self._ended = True
        self._keep = self._parser.should_keep_alive()
        response._finish()


def _heads_end(data: bytes, interim: int) -> int:
    """Where the head after `interim` interim heads ends in `data` (llhttp takes only CRLF line
    ends, and no header line can hold one: each head ends at the next CR LF CR LF)."""
    end = -4
    for _ in range(interim + 1):
        end = data.find(b"\r\n\r\n", end + 4)
        if end < 0:
            return len(data)  # its end straddles two reads: count all of this one
    return end + 4


def _until_eof(response: WireResponse) -> bool:
    headers = response.headers
    return (
        response.status_code >= 200
        and response.status_code not in (204, 304)
        and "content-length" not in headers
        and "chunked" not in headers.get("transfer-encoding", "").lower()
    )


class _Pool:
    """Connections to one host:port: idle ones reused newest first, at most `limit` in use."""

    def __init__(
        self,
        host: str,
        port: int,
        limit: int,
        connect_timeout: float,
        expiry: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self._limit = limit
        self._connect_timeout = connect_timeout
        self._expiry = expiry
        self._idle: list[_Conn] = []
        self._busy = 0  # connections in use, and connections being opened
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def send(self, head: bytes, content: bytes) -> WireResponse:
        conn = await self._acquire(reuse=True)
        response = conn.start(head, content)
        try:
            try:
                await response._head()
            except WireClosed:
                if not (conn.reused and not conn.received):
                    raise
                # The upstream closed an idle keep-alive connection as we reused it (its own
                # keep-alive timer): nothing of the request was answered; once more, fresh.
                conn = await self._acquire(reuse=False)
                response = conn.start(head, content)
                await response._head()
        except BaseException:
            # Cancelled (client gone, first-byte timeout) or failed: closing the connection is
            # what tells the engine to stop. A response already complete left it in the pool.
            await response.aclose()
            raise
        return response

    async def _acquire(self, *, reuse: bool) -> _Conn:
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            if reuse:
                conn = self._take_idle(loop.time())
                if conn is not None:
                    return conn
            if self._busy < self._limit:
                break
            # Full: wait for a connection to come back (reused) or to close (a free slot).
            if deadline is None:
                deadline = loop.time() + self._connect_timeout
            await self._wait_for_slot(loop, deadline)
        self._busy += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except TimeoutError:
            self._vacate()
            raise WireConnectTimeout(f"no connection within {self._connect_timeout:g} s") from None
        except OSError as exc:  # ssl.SSLError (a certificate refused) is an OSError too
            self._vacate()
            raise WireConnectError(str(exc) or type(exc).__name__) from None
        except BaseException:
            self._vacate()
            raise
        if conn.closed:
            self._vacate()
            raise WireConnectError("the connection closed as soon as it opened")
        conn.in_use = True
        return conn

    def _take_idle(self, now: float) -> _Conn | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._expiry:
                conn.in_use = conn.reused = True
                self._busy += 1
                return conn
            conn.close()
        return None

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # Woken, but leaving (cancelled, timed out): the wake-up goes to the next one.
                self._wake_next()
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise WirePoolFull(
                    f"all {self._limit} connections to the upstream stayed busy for "
                    f"{self._connect_timeout:g} s"
                ) from None
            raise

    def _vacate(self) -> None:
        self._busy -= 1
        self._wake_next()

    def _wake_next(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def release(self, conn: _Conn) -> None:
        conn.in_use = False
        now = conn.idle_since = asyncio.get_running_loop().time()
        idle = self._idle
        # Reuse is newest first, so the oldest idle connection could outlive its expiry
        # forever under light load: each return retires it once expired.
        if idle and now - idle[0].idle_since >= self._expiry:
            idle[0].close()
        idle.append(conn)
        self._vacate()

    def discard(self, conn: _Conn) -> None:
        """A connection closed: in use, it frees its slot; idle, it leaves the idle list."""
        if conn.in_use:
            conn.in_use = False
            self._vacate()
        elif conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        for conn in self._idle[:]:
            conn.close(abort=True)


@dataclass(frozen=True)
class Tls:
    """How to authenticate an https:// upstream: the system trust store unless `ca_file`
    names a PEM bundle; `verify = False` encrypts without checking certificate or host name."""

    ca_file: str | None = None
    verify: bool = True

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        # Plain HTTP/1.1 inside TLS: no ALPN negotiation of h2 (the parser speaks 1.1 only).
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


_SYSTEM_TLS = Tls()


class WireClient:
    """`build_request`/`send`/`aclose` (httpx's names) over one pool per upstream origin."""

    def __init__(
        self, *, max_connections: int, connect_timeout: float, keepalive_expiry: float
    ) -> None:
        self._limit = max_connections
        self._connect_timeout = connect_timeout
        self._expiry = keepalive_expiry
        self._pools: dict[tuple[str, int, Tls | None], _Pool] = {}
        # (method url, tls) -> (pool, request line and host header): the forwarder sends to a
        # handful of URLs.
        self._targets: dict[tuple[str, Tls | None], tuple[_Pool, str]] = {}
        self._contexts: dict[Tls, ssl.SSLContext] = {}

    def _target(self, method: str, url: str, tls: Tls | None) -> tuple[_Pool, str]:
        key = (f"{method} {url}", tls)
        target = self._targets.get(key)
        if target is not None:
            return target
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WireConnectError(f"not an http:// or https:// upstream URL: {url!r}")
        secure = parts.scheme == "https"
        if secure and tls is None:
            tls = _SYSTEM_TLS
        elif not secure:
            tls = None  # TLS settings of a plain http:// upstream mean nothing (config refuses)
        port = parts.port or (443 if secure else 80)
        origin = (parts.hostname, port, tls)
        pool = self._pools.get(origin)
        if pool is None:
            context = self._context(tls) if tls is not None else None
            pool = _Pool(
                parts.hostname, port, self._limit, self._connect_timeout, self._expiry, context
            )
            self._pools[origin] = pool
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        target = (pool, f"{method} {path} HTTP/1.1\r\nhost: {parts.netloc}\r\n")
        if len(self._targets) < 4096:
            self._targets[key] = target
        return target

    def _context(self, tls: Tls) -> ssl.SSLContext:
        # One context per distinct setting: building one reads the trust store (milliseconds).
        context = self._contexts.get(tls)
        if context is None:
            context = self._contexts[tls] = tls.context()
        return context

    def build_request(
        self,
        method: str,
        url: str,
        *,
        content: bytes,
        headers: dict[str, str],
        tls: Tls | None = None,
    ) -> WireRequest:
        pool, start = self._target(method, url, tls)
        fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        # One scan of all the fields: a line break in a name or value would start a header
        # (or a request) of its own. Each field ends in exactly one CRLF: anything more is one.
        if fields.count("\n") != len(headers) or fields.count("\r") != len(headers):
            raise ValueError("line break in an outbound header")
        head = f"{start}content-length: {len(content)}\r\n{fields}\r\n"
        return WireRequest(pool, head.encode("latin-1"), content)

    async def send(self, request: object) -> WireResponse:
        assert isinstance(request, WireRequest)
        return await request.pool.send(request.head, request.content)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._targets.clear()
