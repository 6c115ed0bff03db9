"""Rate-limit buckets: GCRA (the generic cell rate algorithm) behind one small storage ABC.

A bucket refills continuously at `rate` units per second and holds at most `capacity` units
(`rate * window`). Its whole state is one number, the theoretical arrival time (TAT): the moment
the bucket will be full again. Taking `cost` units moves the TAT forward by `cost / rate`;
giving units back (a token reservation larger than the real usage) moves it back, never before
now. That makes reserve-then-reconcile exact and cheap, and a Redis implementation one atomic
script over a few string keys.

Every storage takes all the charges of one request at once and either applies all of them or
none (a request refused by its key's budget consumes nothing from the global one).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Rounding slack: a request that fits exactly must not be refused for a float's last bit.
_EPSILON = 1e-9


class Bucket:
    """A budget: `rate` units per second, at most `capacity` at once. Immutable by convention
    (a plain slotted class: it is read on every request, and dataclass overhead shows there)."""

    __slots__ = ("capacity", "interval", "key", "limit_text", "rate", "tokens", "window")

    def __init__(self, key: str, rate: float, capacity: float, tokens: bool = False) -> None:
        self.key = key  # storage key: names only (a key's configured name, a model)
        self.rate = rate  # units per second
        self.capacity = capacity
        self.tokens = tokens  # counts tokens (else requests): which x-ratelimit-* it feeds
        self.interval = 1.0 / rate  # seconds one unit takes to refill
        self.window = capacity / rate  # seconds an empty bucket takes to refill
        self.limit_text = str(math.floor(capacity))  # the x-ratelimit-limit-* value

    def remaining(self, used: float) -> int:
        """Whole units available when the TAT is `used` seconds ahead of now."""
        return max(0, math.floor((self.window - used) * self.rate + _EPSILON))

    def __repr__(self) -> str:
        return f"Bucket({self.key!r}, {self.rate}, {self.capacity}, tokens={self.tokens})"


@dataclass(slots=True)
class Decision:
    allowed: bool
    retry_after: float  # seconds until the refused charges would fit (0 when allowed)
    # Per charge: seconds the bucket's TAT is ahead of now (after the charge; before it when
    # refused). `Bucket.remaining(used)` for headers; `used` itself is the time until full.
    used: list[float]


Charge = tuple[Bucket, float]


class StorageUnavailable(Exception):
    """The shared storage cannot be reached; the policy decides whether to fail open."""


class Storage(ABC):
    """Where bucket states live. `charge` is atomic over all its charges."""

    @abstractmethod
    async def charge(self, charges: Sequence[Charge], *, force: bool = False) -> Decision:
        """Apply every charge or none. Negative costs give units back (never beyond full).
        `force` applies positive costs even past empty (usage larger than reserved)."""

    async def adjust(self, buckets: Sequence[Bucket], delta: float) -> None:
        """Take `delta` more units from every bucket (give back when negative), unconditionally:
        the reconciliation of a reservation with real usage."""
        await self.charge([(b, delta) for b in buckets], force=True)

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most storages hold nothing
        """Release connections."""


def apply(
    charges: Sequence[Charge], force: bool, now: float, tat_of: Callable[[str], float | None]
) -> tuple[Decision, list[float]]:
    """The GCRA step over `charges` at `now`, given each bucket's stored TAT (None: never
    charged): the decision, and the new TATs to store if it allows (a storage stores them)."""
    current: list[float] = []
    after: list[float] = []
    retry = 0.0
    for bucket, cost in charges:
        tat = tat_of(bucket.key)
        if tat is None or tat < now:
            tat = now
        new = tat + cost * bucket.interval
        if new < now:
            new = now
        elif cost > 0 and not force and new - now > bucket.window + _EPSILON:
            retry = max(retry, new - bucket.window - now)
        current.append(tat - now)
        after.append(new - now)
    if retry > 0:
        return Decision(False, retry, current), []
    return Decision(True, 0.0, after), [now + used for used in after]


class MemoryStorage(Storage):
    """In-process buckets: one float per key. Atomic because it never awaits.

    Keys come from configuration (key names, model names), never from client input, so the
    table is bounded without eviction.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}

    async def charge(self, charges: Sequence[Charge], *, force: bool = False) -> Decision:
        decision, tats = apply(charges, force, self._clock(), self._tat.get)
        for (bucket, _), tat in zip(charges, tats, strict=False):
            self._tat[bucket.key] = tat
        return decision

    async def adjust(self, buckets: Sequence[Bucket], delta: float) -> None:
        now = self._clock()
        tats = self._tat
        for bucket in buckets:
            tat = tats.get(bucket.key, now)
            tats[bucket.key] = max(max(tat, now) + delta * bucket.interval, now)
