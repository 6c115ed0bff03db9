"""Retry budget and backoff: how many extra upstream attempts the proxy may make, and when.

A retry multiplies load exactly when an upstream is least able to take it, so extra attempts
(retries and failovers after a failure) are paid from one shared budget, in the spirit of
Envoy's retry budget and Finagle's: each request entering deposits `ratio` of a token, capped at
`max(minimum, ratio x requests in flight)`; each extra attempt spends a whole one. The bucket
starts with `minimum` tokens, so during a total outage extra attempts never exceed
`minimum + ratio x requests`, while a lone failure on a quiet proxy can still be retried.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from proxy.core.binder import check, non_negative, positive


class RetryBudget:
    """Shared by every request of one Runtime; plain arithmetic on the event loop thread."""

    __slots__ = ("_minimum", "_ratio", "active", "balance", "denied", "spent")

    def __init__(self, ratio: float, minimum: int) -> None:
        self._ratio = ratio
        self._minimum = float(minimum)
        self.balance = float(minimum)
        self.active = 0  # requests inside the forwarder
        self.spent = 0  # extra attempts made, for metrics
        self.denied = 0  # extra attempts refused

    def enter(self) -> None:
        """A request starts: it earns `ratio` of a retry for everyone."""
        self.active += 1
        cap = self._ratio * self.active
        if cap < self._minimum:
            cap = self._minimum
        balance = self.balance + self._ratio
        self.balance = balance if balance < cap else cap

    def leave(self) -> None:
        self.active -= 1

    def spend(self) -> bool:
        """Take one token for an extra attempt; False when the budget is exhausted."""
        if self.balance >= 1.0:
            self.balance -= 1.0
            self.spent += 1
            return True
        self.denied += 1
        return False


def backoff(
    retry: int, base: float, cap: float, rand: Callable[[float, float], float] = random.uniform
) -> float:
    """Seconds to wait before retry number `retry` (1, 2, ...): exponential, fully jittered.

    Full jitter (a uniform draw below the exponential bound) spreads the retries of many
    clients that failed together, instead of having them return together.
    """
    bound = base * (2.0 ** (retry - 1))
    return rand(0.0, bound if bound < cap else cap)


@dataclass(frozen=True, kw_only=True)
class BudgetedSettings:
    """`[resilience.retry]` with `kind = "budgeted"` (the default)."""

    # Upstream attempts per request, failovers included (1: never a second attempt).
    attempts: int = check(positive, 3)
    # No retry or backoff starts later than this many seconds after the first attempt.
    deadline: float = check(positive, 30.0)
    # Per attempt, until the first byte (non-streaming: the whole answer); None: only the
    # request's upstream.first_byte_timeout applies, and a timeout is not retried.
    attempt_timeout: float | None = check(lambda v: None if v is None else positive(v), None)
    backoff_base: float = check(positive, 0.025)
    backoff_max: float = check(positive, 0.25)
    # Extra attempts are paid from a budget: `budget_min` plus `budget_ratio` per request.
    budget_ratio: float = check(non_negative, 0.2)
    budget_min: int = check(non_negative, 3)


class BudgetedRetry(RetryBudget):
    """Retries before the first byte, paid from its own `RetryBudget`, with jittered backoff
    (a `proxy.upstream.modules.RetryPolicy`). A subclass, not a wrapper: `enter` and `leave`
    run for every request."""

    __slots__ = ("_base", "_cap", "attempt_timeout", "attempts", "deadline")
    settings_class: ClassVar[type[Any]] = BudgetedSettings

    def __init__(self, settings: BudgetedSettings) -> None:
        super().__init__(settings.budget_ratio, settings.budget_min)
        self.attempts = settings.attempts
        self.deadline = settings.deadline
        self.attempt_timeout = settings.attempt_timeout
        self._base = settings.backoff_base
        self._cap = settings.backoff_max

    @classmethod
    def from_settings(cls, settings: BudgetedSettings) -> BudgetedRetry:
        return cls(settings)

    @property
    def budget(self) -> RetryBudget:
        """The budget the extra attempts are paid from (this object itself)."""
        return self

    def allow(self, free: bool) -> bool:
        return free or self.spend()

    def backoff(self, attempt: int) -> float:
        return backoff(attempt, self._base, self._cap)
