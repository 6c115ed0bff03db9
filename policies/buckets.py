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


@dataclass(frozen=True, slots=True)
class Bucket:
    key: str  # storage key: names only (a key's configured name, a model), never secrets
    rate: float  # units per second
    capacity: float  # units that can be taken at once
    tokens: bool = False  # counts tokens (else requests): which x-ratelimit-* headers it feeds

    @property
    def window(self) -> float:
        """Seconds an empty bucket takes to refill."""
        return self.capacity / self.rate


@dataclass(frozen=True, slots=True)
class BucketState:
    remaining: int  # whole units available now
    reset_after: float  # seconds until the bucket is full again


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after: float  # seconds until the refused charges would fit (0 when allowed)
    states: tuple[BucketState, ...]  # per charge, after the charge (before it, when refused)


Charge = tuple[Bucket, float]


class StorageUnavailable(Exception):
    """The shared storage cannot be reached; the policy decides whether to fail open."""


class Storage(ABC):
    """Where bucket states live. `charge` is atomic over all its charges."""

    @abstractmethod
    async def charge(self, charges: Sequence[Charge], *, force: bool = False) -> Decision:
        """Apply every charge or none. Negative costs give units back (never beyond full).
        `force` applies positive costs even past empty (usage larger than reserved)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most storages hold nothing
        """Release connections."""


def state(bucket: Bucket, used: float) -> BucketState:
    """The headers' view of a bucket whose TAT is `used` seconds ahead of now."""
    used = max(used, 0.0)
    free = (bucket.window - used) * bucket.rate
    return BucketState(max(0, math.floor(free + _EPSILON)), used)


class MemoryStorage(Storage):
    """In-process buckets: one float per key. Atomic because it never awaits.

    Keys come from configuration (key names, model names), never from client input, so the
    table is bounded without eviction.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}

    async def charge(self, charges: Sequence[Charge], *, force: bool = False) -> Decision:
        now = self._clock()
        current: list[float] = []
        after: list[float] = []
        retry = 0.0
        for bucket, cost in charges:
            tat = max(self._tat.get(bucket.key, now), now)
            new = max(tat + cost / bucket.rate, now)
            if cost > 0 and not force and new - now > bucket.window + _EPSILON:
                retry = max(retry, new - bucket.window - now)
            current.append(tat)
            after.append(new)
        if retry > 0:
            return Decision(
                False,
                retry,
                tuple(state(b, t - now) for (b, _), t in zip(charges, current, strict=True)),
            )
        for (bucket, _), new in zip(charges, after, strict=True):
            self._tat[bucket.key] = new
        return Decision(
            True, 0.0, tuple(state(b, t - now) for (b, _), t in zip(charges, after, strict=True))
        )
