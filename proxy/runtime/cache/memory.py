"""The in-process store: an LRU bounded by entries and bytes, each entry with a time to live."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from proxy.runtime.cache.entry import Entry, Stats


class MemoryStore:
    """One process's answers; gone with the process and with a config reload."""

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._ttl = ttl
        self._clock = clock
        # Least recently used first; each entry with the time it stops being served.
        self._items: OrderedDict[str, tuple[Entry, float]] = OrderedDict()
        self._bytes = 0
        self.stats = Stats(entries=0, bytes=0)

    async def get(self, key: str) -> Entry | None:
        item = self._items.get(key)
        if item is None:
            return None
        entry, expires = item
        if self._clock() >= expires:
            self._drop(key, "expired")
            return None
        self._items.move_to_end(key)
        return entry

    async def put(self, key: str, entry: Entry) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[0].size
        now = self._clock()
        self._items[key] = (entry, now + self._ttl)
        self._bytes += entry.size
        items = self._items
        # Expired entries at the cold end go first: they would never be served again.
        while items and next(iter(items.values()))[1] <= now:
            self._drop(next(iter(items)), "expired")
        while len(items) > self._max_entries:
            self._drop(next(iter(items)), "entries")
        while self._bytes > self._max_bytes:
            self._drop(next(iter(items)), "bytes")
        self._count()

    async def aclose(self) -> None:
        self._items.clear()
        self._bytes = 0
        self._count()

    def _drop(self, key: str, reason: str) -> None:
        entry, _ = self._items.pop(key)
        self._bytes -= entry.size
        self.stats.evict(reason)
        self._count()

    def _count(self) -> None:
        self.stats.entries = len(self._items)
        self.stats.bytes = self._bytes
