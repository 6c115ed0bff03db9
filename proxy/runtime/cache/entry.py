"""One kept answer, how it is written for a store that holds bytes, and what a store reports.

An entry is the answer exactly as the client got it: a whole body, or the bytes of a stream
(its events as relayed, the usage event dropped when the client did not ask for it), with its
content type, the headers its family relays, the engine's usage and when it was made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from proxy.core.api import Usage


@dataclass(frozen=True, slots=True)
class Entry:
    content_type: str
    body: bytes
    stream: bool
    headers: dict[str, str]
    usage: Usage | None
    made_at: float  # time.time() when the answer was made (the age a client is told)

    @property
    def size(self) -> int:
        """What the entry counts against `max_bytes` and `max_entry_bytes`."""
        head = len(self.content_type) + sum(len(k) + len(v) for k, v in self.headers.items())
        return len(self.body) + head


def encode(entry: Entry) -> bytes:
    """A JSON line of everything but the body, then the body (orjson writes no raw newline)."""
    usage = list(entry.usage) if entry.usage is not None else None
    meta = {
        "type": entry.content_type,
        "stream": entry.stream,
        "headers": entry.headers,
        "usage": usage,
        "at": entry.made_at,
    }
    return orjson.dumps(meta) + b"\n" + entry.body


def decode(data: bytes) -> Entry | None:
    """The entry `encode` wrote, or None for bytes that are not one (another writer's)."""
    head, sep, body = data.partition(b"\n")
    try:
        meta: Any = orjson.loads(head) if sep else None
        usage = meta["usage"]
        return Entry(
            content_type=str(meta["type"]),
            body=body,
            stream=meta["stream"] is True,
            headers={str(k): str(v) for k, v in meta["headers"].items()},
            usage=Usage(*usage) if isinstance(usage, list) else None,
            made_at=float(meta["at"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


class StoreUnavailable(Exception):
    """The store could not be reached or answered wrongly (Redis down, a timeout)."""


@dataclass
class Stats:
    """What a store did, read at scrape time; `entries` and `bytes` are None until known."""

    evicted: dict[str, int] = field(default_factory=dict)  # reason -> entries removed
    entries: int | None = None
    bytes: int | None = None

    def evict(self, reason: str, count: int = 1) -> None:
        if count:
            self.evicted[reason] = self.evicted.get(reason, 0) + count


class Store(Protocol):
    """Where entries live, bounded by entries, bytes and age (`[cache]`): in-process or Redis.

    Keys are hex digests (proxy.runtime.cache.key). `get` renews an entry's place in the LRU
    order, not its age. Both raise StoreUnavailable when the store cannot answer."""

    stats: Stats

    async def get(self, key: str) -> Entry | None: ...

    async def put(self, key: str, entry: Entry) -> None: ...

    async def aclose(self) -> None: ...
