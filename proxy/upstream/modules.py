"""The attempt-level seams: how an upstream is chosen, guarded, retried, and fallen back from.

Request-level concerns (who may call, how much, what the prompt may hold) are policies: they see
one request once. These see every *attempt* of a request and hold state across requests per
upstream or per runtime, so they are modules of the forwarder rather than pipeline steps
(Envoy's cluster-level breakers and retries, production-stack's routing logic):

- `Balancer`: which of the eligible upstreams takes the next attempt;
- `Breaker`: one per upstream, admits or refuses an attempt and records its outcome;
- `RetryPolicy`: whether a failed attempt may be followed by another, and after what backoff;
- `Fallbacks`: which models a request may move to, in order.

Each built-in lives in its own module and is named in `proxy.upstream.registry`; a new one is
one module and one registry line, selected by `kind` in its config table (`[resilience.breaker]`,
`[resilience.retry]`) or by `[resilience] balancer` / `fallback`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, TypeVar


class Candidate(Protocol):
    """What a balancer may read of an upstream."""

    @property
    def inflight(self) -> int: ...
    @property
    def label_bytes(self) -> bytes: ...


C = TypeVar("C", bound=Candidate)


class Balancer(Protocol):
    def select(self, candidates: Sequence[C], key: int | None) -> C | None:
        """The candidate for the next attempt (None only if there is none). `key` identifies
        the conversation (prefix affinity) or is None."""
        ...


class Breaker(Protocol):
    """Admission and outcome accounting for one upstream.

    Read by /ready and metrics: `current_state` ("closed", "open", "half-open"), `trips`
    (times opened), `rejected` (calls failed fast).
    """

    name: str
    trips: int
    rejected: int

    @property
    def current_state(self) -> str: ...

    def allows(self) -> bool:
        """Whether `admit()` would let a call through now; no side effects (for balancing)."""
        ...

    def admit(self) -> bool:
        """Let one call through (True if it is a half-open probe) or raise CircuitOpen."""
        ...

    def success(self, probe: bool, elapsed: float) -> None:
        """The upstream answered (below 500); `elapsed` is its time to first byte (streams)
        or to the whole answer, in seconds."""
        ...

    def failure(self, probe: bool) -> None:
        """Transport error, timeout or 5xx."""
        ...

    def release(self, probe: bool) -> None:
        """The call ended without an outcome (client gone, shutdown): nothing is counted."""
        ...

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        ...


class BreakerModule(Protocol):
    settings_class: ClassVar[type[Any]]

    @classmethod
    def from_settings(cls, name: str, settings: Any) -> Breaker: ...


class RetryPolicy(Protocol):
    """Shared by every request of one runtime."""

    attempts: int  # upstream attempts per request, failovers included
    deadline: float  # no retry or backoff starts later than this after the first attempt
    attempt_timeout: float | None  # per attempt, until its first byte

    def enter(self) -> None:
        """A request starts."""
        ...

    def leave(self) -> None: ...

    def allow(self, free: bool) -> bool:
        """Whether another attempt may follow a failure; `free` when it adds no engine load
        (the failed upstream never accepted the connection)."""
        ...

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before trying an upstream that already failed this request."""
        ...


class RetryModule(Protocol):
    settings_class: ClassVar[type[Any]]

    @classmethod
    def from_settings(cls, settings: Any) -> RetryPolicy: ...


class Fallbacks(Protocol):
    def chain(self, model: str) -> list[str]:
        """`model` first, then the models a request for it may move to, in order."""
        ...
