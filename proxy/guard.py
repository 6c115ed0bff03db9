"""Cancel the request's own task when the client leaves or the upstream goes quiet.

Starlette notices a disconnect only when it next sends, and a long prefill sends nothing. Under
vgate's own server protocol (proxy.protocol) the connection calls us back when it is lost; under
any other ASGI server a watcher task awaits the `receive` channel (after the body has been read,
its next message is `http.disconnect`). Either way the request task is cancelled, which closes
the upstream connection and makes vLLM abort the generation.

Timeouts use one timer per deadline rather than one per chunk: `touch()` only stores a time, and
the timer re-arms itself lazily, so relaying 100k events/s costs no timer churn.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from starlette.types import Receive, Scope

from proxy.hooks import hooks

Reason = Literal["disconnect", "first_byte_timeout", "idle_timeout", "shutdown"]

# The message the server cancels requests with when its drain timeout ends (proxy.server).
SHUTDOWN = "vgate: shutting down"


class Guard:
    __slots__ = (
        "_deadline_at",
        "_hook",
        "_idle",
        "_last",
        "_loop",
        "_task",
        "_timer",
        "_watcher",
        "first_byte_at",
        "reason",
    )

    def __init__(
        self, scope: Scope, receive: Receive, first_byte_timeout: float, idle_timeout: float
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
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(
            self._deadline_at, self._expire
        )
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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

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

    def _expire(self) -> None:
        if self._deadline_at:
            self._timer = None
            self._cancel("first_byte_timeout")
            return
        due = self._last + self._idle
        now = self._loop.time()
        if now >= due:
            self._timer = None
            self._cancel("idle_timeout")
        else:
            self._timer = self._loop.call_at(due, self._expire)

    def arm_idle(self) -> None:
        """Switch the running timer to the idle deadline (called once, at the first byte)."""
        self.touch()
        self.first_byte_at = time.perf_counter()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(self._last + self._idle, self._expire)

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
