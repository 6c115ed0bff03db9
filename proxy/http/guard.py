"""Cancel the request's own task when the client leaves or the upstream goes quiet.

Starlette notices a disconnect only when it next sends, and a long prefill sends nothing. Under
vgate's own server protocol (proxy.http.protocol) the connection calls us back when it is lost;
under
any other ASGI server a watcher task awaits the `receive` channel (after the body has been read,
its next message is `http.disconnect`). Either way the request task is cancelled, which closes
the upstream connection and makes vLLM abort the generation.

Timeouts use no timer per request: every open guard of an endpoint is checked by one shared
sweep a few times per timeout (`Deadlines`). `touch()` only stores a time, so relaying 100k
events/s costs no timer churn, and a request costs a set insertion instead of a timer. A
deadline fires at most one tick late (a tenth of the shortest timeout, at most 0.25 s).
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from starlette.types import Receive, Scope

from proxy.http.hooks import hooks

Reason = Literal["disconnect", "first_byte_timeout", "idle_timeout", "shutdown"]

# The message the server cancels requests with when its drain timeout ends (proxy.ops.server).
SHUTDOWN = "vgate: shutting down"


class Deadlines:
    """The sweep over every open guard: one timer, running only while some guard is open."""

    __slots__ = ("_guards", "_handle", "_loop", "_tick")

    def __init__(self) -> None:
        self._guards: set[Guard] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick = _MAX_TICK

    def add(self, guard: Guard, loop: asyncio.AbstractEventLoop, shortest: float) -> None:
        self._guards.add(guard)
        tick = min(_MAX_TICK, max(_MIN_TICK, shortest / 10))
        if self._handle is None or loop is not self._loop:
            self._loop = loop
            self._tick = tick
            self._handle = loop.call_later(tick, self._sweep)
        elif tick < self._tick:
            self._tick = tick  # from the next sweep on

    def discard(self, guard: Guard) -> None:
        self._guards.discard(guard)

    def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        for guard in [g for g in self._guards if g.due(now)]:
            self._guards.discard(guard)
            guard.expire()
        if self._guards:
            self._handle = loop.call_later(self._tick, self._sweep)
        else:
            self._handle = None
            self._tick = _MAX_TICK


_MAX_TICK = 0.25
_MIN_TICK = 0.005


class Guard:
    __slots__ = (
        "_deadline_at",
        "_deadlines",
        "_hook",
        "_idle",
        "_last",
        "_loop",
        "_task",
        "_watcher",
        "first_byte_at",
        "reason",
    )

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        deadlines: Deadlines,
        first_byte_timeout: float,
        idle_timeout: float,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._loop = asyncio.get_running_loop()
        self._idle = idle_timeout
        self.reason: Reason | None = None
        # perf_counter() at the first streamed byte, for time-to-first-token (0.0: none yet).
        self.first_byte_at = 0.0
        self._last = self._loop.time()
        self._deadline_at = self._last + first_byte_timeout
        self._deadlines: Deadlines | None = deadlines
        deadlines.add(self, self._loop, min(first_byte_timeout, idle_timeout))
        conn = hooks(scope)
        self._hook = conn.watch_disconnect if conn is not None else None
        if self._hook is not None:
            self._hook(self._disconnected)
            self._watcher: asyncio.Task[None] | None = None
        else:
            self._watcher = self._loop.create_task(self._watch(receive))

    @property
    def started(self) -> bool:
        """Whether the first byte arrived (timeouts switched from first-byte to idle)."""
        return self._deadline_at == 0.0

    def touch(self) -> None:
        """Record upstream progress; the first call switches to the idle timeout."""
        self._last = self._loop.time()
        self._deadline_at = 0.0

    def close(self) -> None:
        """Stop watching; must run whatever the outcome."""
        if self._hook is not None:
            self._hook(None)
            self._hook = None
        if self._watcher is not None:
            self._watcher.cancel()
        if self._deadlines is not None:
            self._deadlines.discard(self)
            self._deadlines = None

    def absorb(self, exc: BaseException | None = None) -> Reason | None:
        """After a CancelledError: our own cancellation is swallowed and its reason returned.

        The server's drain-timeout cancellation (`exc` carrying SHUTDOWN) is absorbed as
        "shutdown"; any other cancellation returns None and must be re-raised.
        """
        if self.reason is None and exc is not None and exc.args == (SHUTDOWN,):
            self.reason = "shutdown"
        if self.reason is None:
            return None
        self._task.uncancel()
        return self.reason

    def due(self, now: float) -> bool:
        if self._deadline_at:
            return now >= self._deadline_at
        return now >= self._last + self._idle

    def expire(self) -> None:
        """Called by the sweep once `due`: cancel the request with the timeout's name."""
        self._deadlines = None
        self._cancel("first_byte_timeout" if self._deadline_at else "idle_timeout")

    def arm_idle(self) -> None:
        """Switch from the first-byte deadline to the idle one (called once, at the first byte)."""
        self.touch()
        self.first_byte_at = time.perf_counter()

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._cancel("disconnect")
                return

    def _disconnected(self) -> None:
        self._hook = None
        self._cancel("disconnect")

    def _cancel(self, reason: Reason) -> None:
        if self.reason is None:
            self.reason = reason
            # The reason travels in the CancelledError: the forwarder counts an upstream that
            # timed out against its circuit breaker, but not a client that went away.
            self._task.cancel(reason)
