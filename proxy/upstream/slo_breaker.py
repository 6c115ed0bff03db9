"""The `slow_call` breaker: opens on the rate of slow calls or of failures over a sliding window.

resilience4j's count-based circuit breaker, for a latency SLO. The last `window_size` outcomes of
an upstream are kept; once at least `min_calls` are on record, the breaker opens when the share
of failures reaches `failure_rate_threshold` or the share of slow calls reaches
`slow_call_rate_threshold`. A call is slow when the upstream answered (any status below 500) but
took longer than `slow_call_duration`: for a stream its time to first token (the attempt hands
the stream back at its first chunk), otherwise the whole answer (proxy.upstream.attempt). A
failure (transport error, timeout, 5xx) counts as a failure only: it has no answer to time.

Open, it fails fast for `reset_timeout` seconds, then goes half-open and lets `half_open_calls`
probes through, at once or one after another; their outcomes alone decide: over either
threshold it opens again, else it closes with an empty window. It decides as soon as the
remaining probes cannot change the result, and a probe that has not answered within
`reset_timeout` no longer holds its place.

The engine was never down, only slow, so this is what moves traffic to a model's `fallbacks`
(a smaller model) while the SLO is missed, and back once probes are fast again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from proxy.core.binder import check, fraction, positive
from proxy.core.errors import CircuitOpen

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"

_FAILED = 1
_SLOW = 2


@dataclass(frozen=True, kw_only=True)
class SlowCallSettings:
    """`[resilience.breaker]` with `kind = "slow_call"`."""

    enabled: bool = True  # false: the accounting is kept, the breaker never opens
    window_size: int = check(positive, 20)  # the last N outcomes are what the rates are of
    min_calls: int = check(positive, 10)  # outcomes on record before a rate can open it
    # Seconds: time to first token (streams) or to the whole answer, above which a call is slow.
    slow_call_duration: float = check(positive, 5.0)
    slow_call_rate_threshold: float = check(fraction, 0.5)
    failure_rate_threshold: float = check(fraction, 0.5)
    reset_timeout: float = check(positive, 30.0)  # seconds open before probes go through
    half_open_calls: int = check(positive, 3)  # probes whose outcomes decide

    def problems(self) -> list[str]:
        if self.min_calls > self.window_size:
            return [
                f"min_calls: {self.min_calls} is more than window_size ({self.window_size}): "
                "the breaker could never open"
            ]
        return []


class _Rates:
    """Outcomes and how many of them failed or were slow."""

    __slots__ = ("calls", "failed", "slow")

    def __init__(self) -> None:
        self.calls = self.failed = self.slow = 0

    def add(self, flags: int, sign: int = 1) -> None:
        self.calls += sign
        self.failed += sign * (flags & _FAILED)
        self.slow += sign * ((flags & _SLOW) >> 1)


class SlowCallBreaker:
    """A `proxy.upstream.modules.Breaker` on failure and slow-call rates."""

    settings_class: ClassVar[type[Any]] = SlowCallSettings

    def __init__(
        self,
        name: str,
        settings: SlowCallSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        s = settings or SlowCallSettings()
        self.name = name
        self.settings = s
        self.trips = 0
        self.rejected = 0
        self.slow_calls = 0  # every slow answer seen, for operators
        self._clock = clock
        self._state = CLOSED
        self._window: deque[int] = deque()
        self._rates = _Rates()
        self._opened_at = 0.0
        self._probes = 0  # probes out now
        self._probe_rates = _Rates()  # outcomes of this half-open round
        self._probe_expiry = 0.0

    @classmethod
    def from_settings(cls, name: str, settings: SlowCallSettings) -> SlowCallBreaker:
        return cls(name, settings)

    @property
    def current_state(self) -> str:
        return self._state

    def rates(self) -> tuple[int, float, float]:
        """(outcomes in the window, failure rate, slow-call rate), for /ready and tests."""
        r = self._rates
        if not r.calls:
            return 0, 0.0, 0.0
        return r.calls, r.failed / r.calls, r.slow / r.calls

    def retry_in(self) -> float:
        if self._state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.settings.reset_timeout - self._clock())

    def allows(self) -> bool:
        state = self._state
        if state == CLOSED:
            return True
        now = self._clock()
        if state == OPEN:
            return now >= self._opened_at + self.settings.reset_timeout
        return self._room() or now >= self._probe_expiry

    def admit(self) -> bool:
        state = self._state
        if state == CLOSED:
            return False
        now = self._clock()
        if state == OPEN:
            if now < self._opened_at + self.settings.reset_timeout:
                raise self._reject()
            # Probes of an earlier round still out keep their places until they expire.
            self._state = HALF_OPEN
            self._probe_rates = _Rates()
        elif not self._room() and now < self._probe_expiry:
            raise self._reject()
        self._probes += 1
        self._probe_expiry = now + self.settings.reset_timeout
        return True

    def success(self, probe: bool, elapsed: float) -> None:
        slow = elapsed > self.settings.slow_call_duration
        if slow:
            self.slow_calls += 1
        self._record(probe, _SLOW if slow else 0)

    def failure(self, probe: bool) -> None:
        self._record(probe, _FAILED)

    def release(self, probe: bool) -> None:
        if probe:
            self._probes -= 1

    def _room(self) -> bool:
        return self._probes + self._probe_rates.calls < self.settings.half_open_calls

    def _record(self, probe: bool, flags: int) -> None:
        if probe:
            self._probes -= 1
            if self._state == HALF_OPEN:
                self._probe_rates.add(flags)
                self._decide()
            return
        if self._state != CLOSED:
            return  # admitted before it opened: says nothing about the upstream now
        window = self._window
        if len(window) >= self.settings.window_size:
            self._rates.add(window.popleft(), -1)
        window.append(flags)
        self._rates.add(flags)
        if self._rates.calls >= self.settings.min_calls and self._over(self._rates, 0):
            self._open()

    def _over(self, r: _Rates, pending: int) -> bool:
        """Whether `r` (plus `pending` outcomes yet to come, counted as good) is over a
        threshold. Rates are of `r.calls + pending` calls."""
        total = r.calls + pending
        s = self.settings
        return r.failed >= s.failure_rate_threshold * total or (
            r.slow >= s.slow_call_rate_threshold * total
        )

    def _decide(self) -> None:
        r = self._probe_rates
        n = self.settings.half_open_calls
        left = n - r.calls
        if self._over(r, left):
            self._open()  # even if every probe still out is good
        elif left <= 0 or not self._may_still_open(r, left, n):
            self._close()

    def _may_still_open(self, r: _Rates, left: int, n: int) -> bool:
        """Whether the probes still to answer could take the round over a threshold."""
        s = self.settings
        failed, slow = r.failed + left, r.slow + left
        return failed >= s.failure_rate_threshold * n or slow >= s.slow_call_rate_threshold * n

    def _open(self) -> None:
        if not self.settings.enabled:
            return
        self._state = OPEN
        self._opened_at = self._clock()
        self.trips += 1
        self._reset_window()

    def _close(self) -> None:
        self._state = CLOSED
        self._reset_window()

    def _reset_window(self) -> None:
        self._window.clear()
        self._rates = _Rates()
        self._probe_rates = _Rates()

    def _reject(self) -> CircuitOpen:
        self.rejected += 1
        wait = max(1, round(self.retry_in()))
        return CircuitOpen(
            f"Upstream {self.name} is failing or over its latency SLO; its circuit breaker is "
            "open.",
            headers={"retry-after": str(wait)},
        )
