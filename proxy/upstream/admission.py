"""Backpressure for one model: a cap on requests in flight per upstream, and a bounded wait.

Taking a slot is a comparison and an increment while there is room; only a request that finds
every upstream full creates a future and waits, in a heap ordered by key priority (higher first)
then arrival. A freed slot passes straight to the best waiter (no stampede, no barging); a full
queue sheds the newcomer, unless it outranks the lowest-priority waiter, which is shed instead.
Every refusal is immediate, labelled in `request.outcome.shed` and counted, and carries
Retry-After: never an unbounded queue.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from typing import Any, Generic, Protocol, TypeVar

from proxy.core.errors import Overloaded
from proxy.core.pipeline import Outcome


class Slotted(Protocol):
    """What holds slots: an upstream's count of requests in flight."""

    inflight: int


Upstream = TypeVar("Upstream", bound=Slotted)

# [negated priority, arrival, future, the waiter's request outcome]: a list so a heap entry
# compares cheaply (arrival is unique, so comparison never reaches the future).
_Waiter = list[Any]


class Admission(Generic[Upstream]):
    """Slots and the waiting room of one model's upstreams."""

    def __init__(
        self,
        *,
        max_inflight: int = 256,
        queue_size: int = 256,
        max_wait: float = 10.0,
        retry_after: int = 1,
    ) -> None:
        self.max_inflight = max_inflight
        self.queue_size = queue_size
        self.max_wait = max_wait
        self.retry_after = retry_after
        self.waiting = 0  # live waiters (the heap may also hold finished ones until popped)
        self.shed: dict[str, int] = {}  # reason -> count, for metrics
        self._heap: list[_Waiter] = []
        self._arrivals = 0

    def take(self, upstream: Upstream) -> bool:
        """Take a slot on `upstream` if it has room (the uncontended path: no waiting)."""
        if upstream.inflight < self.max_inflight:
            upstream.inflight += 1
            return True
        return False

    def release(self, upstream: Upstream) -> None:
        """Give back a slot on `upstream`: to the best waiter if there is one."""
        heap = self._heap
        while heap:
            future = heapq.heappop(heap)[2]
            if not future.done():
                self.waiting -= 1
                future.set_result(upstream)  # the slot changes hands: inflight unchanged
                return
        upstream.inflight -= 1

    async def wait(self, outcome: Outcome, priority: int, limit: float) -> Upstream:
        """Wait at most `min(max_wait, limit)` for a slot; returns the upstream it is on.

        Raises Overloaded (503 + Retry-After) when the queue is full or the wait runs out.
        """
        if self.waiting >= self.queue_size and not self._evict_below(priority):
            raise self.refuse(outcome, "queue_full")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Upstream] = loop.create_future()
        self._arrivals += 1
        heapq.heappush(self._heap, [-priority, self._arrivals, future, outcome])
        self.waiting += 1
        if len(self._heap) > 2 * self.queue_size + 16:
            self._compact()
        began = time.monotonic()
        try:
            async with asyncio.timeout(min(self.max_wait, limit)):
                upstream = await future
        except BaseException as exc:
            if not future.done() or future.cancelled():
                # Our own cancellation (a timeout, the client leaving) cancels the future too.
                future.cancel()
                self.waiting -= 1
            elif future.exception() is None:
                # The slot arrived just as we gave up: pass it on, never leak it.
                self.release(future.result())
            if isinstance(exc, TimeoutError):
                raise self.refuse(outcome, "queue_timeout") from None
            raise
        outcome.queue_wait = round(time.monotonic() - began, 6)
        return upstream

    def _evict_below(self, priority: int) -> bool:
        """Shed the lowest-priority, latest waiter if it ranks below `priority`."""
        victim: _Waiter | None = None
        for entry in self._heap:
            if entry[2].done():
                continue
            if (
                victim is None
                or entry[0] > victim[0]
                or (entry[0] == victim[0] and entry[1] > victim[1])
            ):
                victim = entry
        if victim is None or -victim[0] >= priority:
            return False
        self.waiting -= 1
        victim[2].set_exception(self.refuse(victim[3], "preempted"))
        return True

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if not entry[2].done()]
        heapq.heapify(self._heap)

    def refuse(self, outcome: Outcome, reason: str) -> Overloaded:
        """Count and label a shed request; returns the error to raise."""
        outcome.shed = reason
        self.shed[reason] = self.shed.get(reason, 0) + 1
        return Overloaded(
            f"The model's upstreams are at capacity ({reason.replace('_', ' ')}); "
            "retry after a moment.",
            headers={"retry-after": str(self.retry_after)},
        )
