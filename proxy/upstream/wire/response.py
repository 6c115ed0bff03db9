"""One request as it goes out, and one response as it comes in (the httpx names the forwarder
uses): its head, then its body as the connection feeds it."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Mapping
from typing import Protocol

from proxy.upstream.wire.errors import WireError

# A streamed response whose reader (the client of the proxy) falls behind stops reading the
# upstream socket at the high-water mark: a slow client costs at most this much memory, and the
# engine's own flow control takes over.
HIGH_WATER = 256 * 1024


class Feed(Protocol):
    """The connection a response reads from (proxy.upstream.wire.conn)."""

    @property
    def paused(self) -> bool: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def abandon(self) -> None: ...


class Sends(Protocol):
    """Where a request goes: its origin's pool (proxy.upstream.wire.pool)."""

    async def send(self, head: bytes, content: bytes) -> WireResponse: ...


class WireRequest:
    __slots__ = ("content", "head", "pool")

    def __init__(self, pool: Sends, head: bytes, content: bytes) -> None:
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

    def __init__(self, conn: Feed) -> None:
        self._conn: Feed | None = conn
        self.status_code = 0
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._headers: dict[str, str] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._done = False
        self._error: WireError | None = None
        self._waiter: asyncio.Future[None] | None = None

    def header(self, name: bytes) -> str | None:
        """One header's value (several fields of that name joined by ", "), without decoding
        every header: read for every answer, while `headers` is for the rare caller that wants
        them all. `name` is lower case."""
        size = len(name)
        found: str | None = None
        for key, value in self._raw_headers:
            if len(key) == size and key.lower() == name:
                text = value.decode("latin-1")
                found = text if found is None else f"{found}, {text}"
        return found

    @property
    def content_type(self) -> str:
        """The response's content-type (what the proxy relays)."""
        return self.header(b"content-type") or "application/json"

    @property
    def content_encoding(self) -> str | None:
        """The response's content-encoding, if any (the proxy asked for identity)."""
        return self.header(b"content-encoding")

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
        if self._size > HIGH_WATER and self._conn is not None:
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
