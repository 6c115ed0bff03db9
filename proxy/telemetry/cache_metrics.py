"""The response cache's metrics: what it answered, kept and dropped.

Hits, misses and stores are counted per finished request from `request.outcome.cache` (so they
survive reloads like every per-request counter). Evictions, entries and bytes are the store's
own figures (proxy.runtime.cache.Stats), read at scrape time: they restart from 0 when a reload
builds a new store. With Redis, entries and bytes are the last figures this process saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from proxy.runtime.runtime import Runtime
from proxy.telemetry.registry import Counter, Family, Gauge, Registry


class CacheMetrics:
    def __init__(self, registry: Registry) -> None:
        self.hits = registry.counter(
            "vgate_cache_hits_total",
            "Requests answered from the response cache after every upstream failed.",
            ("model",),
        )
        self.misses = registry.counter(
            "vgate_cache_misses_total",
            "Requests whose upstreams all failed and that the response cache had no answer for.",
            ("model",),
        )
        self.stores = registry.counter(
            "vgate_cache_stores_total", "Answers kept in the response cache.", ("model",)
        )
        self._by_outcome = {"fallback": self.hits, "miss": self.misses, "stored": self.stores}

    def record(self, model: str, cache: str) -> None:
        counter = self._by_outcome.get(cache)
        if counter is not None:
            counter.labels(model).inc()

    def collect(self, rt: Runtime) -> Iterator[Family[Any]]:
        if rt.cache is None:
            return
        stats = rt.cache.store.stats
        evictions = Counter(
            "vgate_cache_evictions_total",
            "Answers dropped from the response cache, by reason (entries, bytes, expired).",
            ("reason",),
        )
        for reason, count in stats.evicted.items():
            evictions.labels(reason).set(count)
        yield evictions
        for name, value, what in (
            ("vgate_cache_entries", stats.entries, "Answers in the response cache."),
            ("vgate_cache_bytes", stats.bytes, "Bytes of the answers in the response cache."),
        ):
            if value is not None:
                gauge = Gauge(name, what)
                gauge.labels().set(value)
                yield gauge
