"""One contract, every response-cache store: in-process and a real redis-server. Bounded by
entries, by bytes and by age; the least recently used answer goes first."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.core.api import Usage
from proxy.runtime.cache import Entry, MemoryStore, Store
from proxy.runtime.cache.entry import StoreUnavailable, decode, encode
from proxy.runtime.cache.redis_store import RedisStore
from tests.resilience.conftest import closed_port_url

STORES = ["memory", pytest.param("redis", marks=pytest.mark.redis)]
Factory = Callable[..., Store]


@pytest.fixture(params=STORES)
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    made: list[Store] = []

    def factory(max_entries: int = 100, max_bytes: int = 1 << 20, ttl: float = 60.0) -> Store:
        store: Store
        if request.param == "memory":
            store = MemoryStore(max_entries=max_entries, max_bytes=max_bytes, ttl=ttl)
        else:
            url = request.getfixturevalue("redis_url")
            # A namespace per store: tests share one redis-server.
            prefix = f"test:{uuid.uuid4().hex}"
            store = RedisStore(
                url, prefix=prefix, max_entries=max_entries, max_bytes=max_bytes, ttl=ttl
            )
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.aclose()


def entry(body: bytes = b'{"choices":[]}', stream: bool = False) -> Entry:
    return Entry(
        content_type="text/event-stream" if stream else "application/json",
        body=body,
        stream=stream,
        headers={"metadata": "{}"},
        usage=Usage(7, 3),
        made_at=1234.5,
    )


async def test_an_entry_comes_back_as_it_was_put(make: Factory) -> None:
    store = make()
    kept = entry(b"data: {}\n\ndata: [DONE]\n\n\x00\xff", stream=True)
    await store.put("a" * 64, kept)
    assert await store.get("a" * 64) == kept
    assert await store.get("b" * 64) is None
    assert store.stats.entries == 1


async def test_a_key_put_again_is_replaced_not_counted_twice(make: Factory) -> None:
    store = make()
    await store.put("k", entry(b"x" * 100))
    size = store.stats.bytes
    await store.put("k", entry(b"y" * 100))
    assert store.stats.entries == 1 and store.stats.bytes == size
    found = await store.get("k")
    assert found is not None and found.body == b"y" * 100


async def test_past_max_entries_the_least_recently_used_goes(make: Factory) -> None:
    store = make(max_entries=2)
    await store.put("a", entry(b"a"))
    await store.put("b", entry(b"b"))
    assert await store.get("a") is not None  # a is now the most recently used
    await store.put("c", entry(b"c"))
    assert await store.get("b") is None
    assert await store.get("a") is not None and await store.get("c") is not None
    assert store.stats.evicted == {"entries": 1}
    assert store.stats.entries == 2


async def test_past_max_bytes_the_oldest_go_until_it_fits(make: Factory) -> None:
    one = len(encode(entry(b"x" * 1000)))  # Redis counts what it stores: a little more
    store = make(max_bytes=int(2.5 * one))
    for key in "abc":
        await store.put(key, entry(b"x" * 1000))
    assert await store.get("a") is None
    assert await store.get("b") is not None and await store.get("c") is not None
    assert store.stats.evicted == {"bytes": 1}
    assert store.stats.bytes is not None and store.stats.bytes <= 2.5 * one


async def test_an_entry_is_not_served_past_its_ttl(make: Factory) -> None:
    store = make(ttl=0.2)
    await store.put("old", entry())
    await asyncio.sleep(0.25)
    assert await store.get("old") is None
    assert store.stats.evicted.get("expired") == 1
    await store.put("new", entry())
    assert await store.get("new") is not None


async def test_expired_entries_leave_the_index_on_the_next_put(make: Factory) -> None:
    store = make(ttl=0.2, max_entries=10)
    await store.put("a", entry())
    await store.put("b", entry())
    await asyncio.sleep(0.25)
    await store.put("c", entry())
    assert store.stats.entries == 1
    assert store.stats.evicted.get("expired") == 2


async def test_redis_unreachable_is_store_unavailable() -> None:
    store = RedisStore(
        closed_port_url().replace("http://", "redis://"),
        prefix="x",
        max_entries=1,
        max_bytes=100,
        ttl=1.0,
        timeout=0.2,
    )
    try:
        with pytest.raises(StoreUnavailable):
            await store.get("k")
        with pytest.raises(StoreUnavailable):
            await store.put("k", entry())
    finally:
        await store.aclose()


def test_bytes_that_are_not_an_entry_decode_to_none() -> None:
    assert decode(b"") is None
    assert decode(b"not json\nbody") is None
    assert decode(b'{"type": "x"}\nbody') is None
    assert decode(encode(entry())) == entry()
