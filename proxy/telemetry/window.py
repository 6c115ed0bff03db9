"""The last minute per model: requests finished and their times to first token.

Prometheus gets rates from counters (`rate(vgate_requests_total[1m])`), but one look at a
running proxy (`vgate status`) has a single scrape and no history. So the proxy keeps the last
`span` seconds itself, in one slot per second per model: a count, and the TTFTs in log-spaced
buckets (10 % apart, so a quantile read off them is within a few per cent, where the exported
histogram's bounds are 2x apart). `add` runs in the observer's batches, off the request path:
a dict lookup, an int() and a bisect. Scrape time sums at most `span` slots per model.

Memory is bounded: models are bounded labels, each has `span` slots, a slot's bucket list exists
only once a stream finished in its second, and a slot is reused when its second comes round.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from proxy.telemetry.registry import Family, Gauge

SPAN = 60
QUANTILES = (0.5, 0.95)
# 1 ms .. ~2 min; a TTFT outside is clamped to the ends (p95 reads "at least 2 min").
BOUNDS = tuple(0.001 * 1.1**i for i in range(123))


class _Slot:
    __slots__ = ("requests", "second", "ttft")

    def __init__(self) -> None:
        self.second = -1
        self.requests = 0
        self.ttft: list[int] | None = None


class RecentWindow:
    """Requests and TTFTs of the last `span` seconds by model label; times are `clock()` values
    (`time.perf_counter`, as in `proxy.telemetry.records.Finished`)."""

    def __init__(self, span: int = SPAN, clock: Callable[[], float] = time.perf_counter) -> None:
        self.span = span
        self._clock = clock
        self._since = clock()
        self._models: dict[str, list[_Slot]] = {}

    def add(self, model: str, at: float, ttft: float | None) -> None:
        """One request of `model` finished at `at`, with its TTFT when it streamed."""
        second = int(at)
        slots = self._models.get(model)
        if slots is None:
            slots = self._models[model] = [_Slot() for _ in range(self.span)]
        slot = slots[second % self.span]
        if slot.second != second:
            if slot.second > second:
                return  # older than the window (a batch recorded a minute late)
            slot.second, slot.requests, slot.ttft = second, 0, None
        slot.requests += 1
        if ttft is not None:
            if slot.ttft is None:
                slot.ttft = [0] * (len(BOUNDS) + 1)
            slot.ttft[bisect_left(BOUNDS, ttft)] += 1

    def covered(self, now: float) -> float:
        """Seconds the window spans at `now`: the current second so far and the `span - 1`
        whole ones before it, or less since the window began (a proxy started just now)."""
        return max(0.0, min(now - self._since, self.span - 1 + (now - int(now))))

    def summary(self, now: float) -> dict[str, tuple[int, dict[float, float]]]:
        """Per model: requests in the window, and the TTFT quantiles (empty: no stream)."""
        oldest = int(now) - self.span + 1
        out: dict[str, tuple[int, dict[float, float]]] = {}
        for model, slots in self._models.items():
            requests = 0
            buckets = [0] * (len(BOUNDS) + 1)
            for slot in slots:
                if slot.second < oldest:
                    continue
                requests += slot.requests
                if slot.ttft is not None:
                    buckets = [a + b for a, b in zip(buckets, slot.ttft, strict=True)]
            out[model] = (requests, {q: v for q in QUANTILES if (v := quantile(buckets, q)) >= 0})
        return out

    def families(self) -> Iterator[Family[Any]]:
        """The window as gauges, read at scrape time."""
        now = self._clock()
        span = Gauge(
            "vgate_recent_window_seconds",
            "Seconds the vgate_recent_* figures cover: the last minute, or since the start.",
        )
        span.labels().set(round(self.covered(now), 3))
        requests = Gauge(
            "vgate_recent_requests",
            "Completion requests finished within vgate_recent_window_seconds.",
            ("model",),
        )
        ttft = Gauge(
            "vgate_recent_ttft_seconds",
            "Time to first token of the streams finished within vgate_recent_window_seconds.",
            ("model", "quantile"),
        )
        for model, (count, quantiles) in self.summary(now).items():
            requests.labels(model).set(count)
            for q, value in quantiles.items():
                ttft.labels(model, q).set(round(value, 6))
        yield from (span, requests, ttft)


def quantile(buckets: list[int], q: float) -> float:
    """The `q` quantile of counts in `BOUNDS` buckets, interpolated inside its bucket as
    Prometheus' histogram_quantile does; -1 when there is nothing to read."""
    total = sum(buckets)
    if total == 0:
        return -1.0
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i == len(BOUNDS):
                return BOUNDS[-1]
            low = BOUNDS[i - 1] if i else 0.0
            return low + (BOUNDS[i] - low) * (rank - seen) / count
        seen += count
    return BOUNDS[-1]
