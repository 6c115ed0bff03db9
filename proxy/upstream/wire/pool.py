"""Connections to one upstream origin: idle ones reused newest first, a bound on those in use."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl

from proxy.upstream.wire.conn import Conn
from proxy.upstream.wire.errors import (
    WireClosed,
    WireConnectError,
    WireConnectTimeout,
    WirePoolFull,
)
from proxy.upstream.wire.response import WireResponse

# The pool is the connections' owner (proxy.upstream.wire.conn.Owner).


class Pool:
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
        self._idle: list[Conn] = []
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

    async def _acquire(self, *, reuse: bool) -> Conn:
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
                    lambda: Conn(self),
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

    def _take_idle(self, now: float) -> Conn | None:
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

    def release(self, conn: Conn) -> None:
        conn.in_use = False
        now = conn.idle_since = asyncio.get_running_loop().time()
        idle = self._idle
        # Reuse is newest first, so the oldest idle connection could outlive its expiry
        # forever under light load: each return retires it once expired.
        if idle and now - idle[0].idle_since >= self._expiry:
            idle[0].close()
        idle.append(conn)
        self._vacate()

    def discard(self, conn: Conn) -> None:
        """A connection closed: in use, it frees its slot; idle, it leaves the idle list."""
        if conn.in_use:
            conn.in_use = False
            self._vacate()
        elif conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        for conn in self._idle[:]:
            conn.close(abort=True)
