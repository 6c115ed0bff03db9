"""One upstream connection: an asyncio protocol feeding httptools, and the response it carries.

A connection goes back to its pool only if its bytes were exactly one response to the request
it carried: anything after that response's end (a byte in the same read, a byte while idle) or
an answer that came while the request was still being written retires it.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

import httptools

from proxy.upstream.wire.errors import WireClosed, WireError, WireProtocolError
from proxy.upstream.wire.response import WireResponse


class Owner(Protocol):
    """What a connection tells its pool (proxy.upstream.wire.pool)."""

    def release(self, conn: Conn) -> None: ...
    def discard(self, conn: Conn) -> None: ...


# Bodies above this go out as two buffers instead of one concatenated copy.
_CONCAT_MAX = 64 * 1024
_CR, _LF = 13, 10
# Bytes a response may send without a body byte among them: its head, interim responses, chunk
# framing, trailers. vLLM's heads are a few hundred bytes; llhttp passes header lines to
# httptools, which buffers each whole, so a head that never ends must be cut off somewhere.
_MAX_BARE = 64 * 1024
_VERSIONS = ("1.1", "1.0")
_HTTP = b"HTTP/"


class Conn(asyncio.Protocol):
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

    def __init__(self, pool: Owner) -> None:
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
        coding = response.header(b"transfer-encoding")
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
    return (
        response.status_code >= 200
        and response.status_code not in (204, 304)
        and response.header(b"content-length") is None
        and "chunked" not in (response.header(b"transfer-encoding") or "").lower()
    )
