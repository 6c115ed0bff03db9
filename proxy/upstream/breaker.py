"""The `consecutive` breaker: pybreaker's state machine, driven correctly from asyncio.

pybreaker cannot guard a coroutine: `call()` on an `async def` counts a success as soon as the
coroutine object exists, and `asyncio.CancelledError` (a BaseException) would count as a failure.
So the attempt is never run *inside* pybreaker. The forwarder asks `admit()` before an attempt
and, once the outcome is known, replays it synchronously through `CircuitBreaker.calling()`:
pybreaker keeps its own counters, transitions, listeners and storage, and the outcome that
reaches it is exactly the one we decided to count (transport errors, timeouts, 5xx), never a
4xx (a success: the engine answered) or a client cancellation (`release()`: no outcome at all).

pybreaker also lets every concurrent call through while half-open; `admit()` lets at most
`half_open_max` probes out at once and fails the rest fast, like the open state does (a probe
that has not answered within `reset_timeout` no longer blocks the next one).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import pybreaker

from proxy.core.binder import check, positive
from proxy.core.errors import CircuitOpen

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN


@dataclass(frozen=True, kw_only=True)
class ConsecutiveSettings:
    """`[resilience.breaker]` with `kind = "consecutive"` (the default)."""

    enabled: bool = True  # false: the accounting is kept, the breaker never opens
    fail_max: int = check(positive, 5)  # consecutive failures that open it
    reset_timeout: float = check(positive, 30.0)  # seconds open before a probe goes through
    # Requests let through at once while half-open (pybreaker alone would let all through).
    half_open_max: int = check(positive, 1)


class _Failure(Exception):
    """What a counted failure looks like to pybreaker when it is replayed."""


class _Mirror(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: ConsecutiveBreaker) -> None:
        self._owner = owner

    def state_change(self, cb: object, old_state: object, new_state: object) -> None:
        self._owner._changed(getattr(new_state, "name", CLOSED))


class ConsecutiveBreaker:
    """Opens after `fail_max` consecutive failures (a `proxy.upstream.modules.Breaker`)."""

    settings_class: ClassVar[type[Any]] = ConsecutiveSettings

    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 5,
        reset_timeout: float = 30.0,
        half_open_max: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.reset_timeout = reset_timeout
        self.half_open_max = half_open_max
        self.trips = 0
        self.rejected = 0
        self._clock = clock
        self._opened_at = 0.0
        self._probes = 0
        # A probe that hangs must not keep the breaker half-open forever: after reset_timeout
        # another one may go.
        self._probe_expiry = 0.0
        # Mirrors of pybreaker's state and "some failure is on record", kept by its listener
        # and by us: the hot path reads two attributes instead of its storage properties.
        self._closed = True
        self._dirty = False
        # throw_new_error_on_trip=False: a replayed failure that trips the breaker must not
        # turn into pybreaker's own error; the caller already has the real one.
        self.cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            name=name,
            throw_new_error_on_trip=False,
            listeners=[_Mirror(self)],
        )

    @classmethod
    def from_settings(cls, name: str, settings: ConsecutiveSettings) -> ConsecutiveBreaker:
        return cls(
            name,
            # Disabled: a breaker that never opens keeps one code path for both.
            fail_max=settings.fail_max if settings.enabled else 2**62,
            reset_timeout=settings.reset_timeout,
            half_open_max=settings.half_open_max,
        )

    @property
    def current_state(self) -> str:
        state: str = self.cb.current_state
        return state

    @property
    def fail_counter(self) -> int:
        count: int = self.cb.fail_counter
        return count

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        if self.cb.current_state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.reset_timeout - self._clock())

    def allows(self) -> bool:
        """Whether `admit()` would let a call through now; no side effects (for balancing)."""
        if self._closed:
            return True
        state = self.cb.current_state
        if state == CLOSED:
            return True
        if state == OPEN:
            return self._clock() >= self._opened_at + self.reset_timeout
        return self._probes < self.half_open_max or self._clock() >= self._probe_expiry

    def admit(self) -> bool:
        """Let one call through, or raise CircuitOpen without touching the upstream.

        Returns True when the call is a half-open probe: pass that to the outcome method.
        """
        if self._closed:
            return False
        state = self.cb.current_state
        if state == CLOSED:
            return False
        if state == OPEN:
            if self._clock() < self._opened_at + self.reset_timeout:
                raise self._reject()
            self.cb.half_open()
        now = self._clock()
        if self._probes >= self.half_open_max and now < self._probe_expiry:
            raise self._reject()
        self._probes += 1
        self._probe_expiry = now + self.reset_timeout
        return True

    def success(self, probe: bool, elapsed: float = 0.0) -> None:
        """The upstream answered (any status below 500); how fast does not matter here."""
        if not probe and self._closed and not self._dirty:
            return  # the hot path: closed, nothing on record to reset
        if probe:
            self._probes -= 1
            if self.cb.current_state != HALF_OPEN:
                return
        elif self.cb.current_state != CLOSED or self.cb.fail_counter == 0:
            # A late success from before the breaker opened must not close it.
            return
        with self.cb.calling():
            pass
        self._dirty = False

    def failure(self, probe: bool) -> None:
        """Transport error, timeout or 5xx."""
        if probe:
            self._probes -= 1
            if self.cb.current_state != HALF_OPEN:
                return
        elif self.cb.current_state != CLOSED:
            return  # already open: a late failure must not restart the reset timer
        self._dirty = True
        with contextlib.suppress(_Failure, pybreaker.CircuitBreakerError), self.cb.calling():
            raise _Failure

    def release(self, probe: bool) -> None:
        """The call ended without an outcome (client gone, shutdown): nothing is counted."""
        if probe:
            self._probes -= 1

    def _changed(self, state: str) -> None:
        self._closed = state == CLOSED
        if state == OPEN:
            self._opened_at = self._clock()
            self.trips += 1
        elif state == CLOSED:
            self._dirty = False  # closing resets pybreaker's counter

    def _reject(self) -> CircuitOpen:
        self.rejected += 1
        wait = max(1, round(self.retry_in()))
        return CircuitOpen(
            f"Upstream {self.name} is failing; its circuit breaker is open.",
            headers={"retry-after": str(wait)},
        )
