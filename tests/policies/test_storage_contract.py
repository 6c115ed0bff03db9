"""One contract, every rate-limit storage: in-process and a real redis-server."""

from __future__ import annotations

import asyncio
import pathlib
import socket
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from policies.buckets import Bucket, MemoryStorage, Storage, StorageUnavailable
from policies.redis_storage import RedisStorage
from policies.shm_storage import SharedFileStorage

STORAGES = ["memory", "shared_file", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(params=STORAGES)
async def storage(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Storage]:
    if request.param == "memory":
        yield MemoryStorage()
        return
    if request.param == "shared_file":
        shared = SharedFileStorage(tmp_path / "ratelimit.table")
        yield shared
        await shared.aclose()
        return
    url = request.getfixturevalue("redis_url")
    store = RedisStorage(url, timeout=1.0)
    yield store
    await store.aclose()


def bucket(per_second: float, capacity: float, tokens: bool = False) -> Bucket:
    # A fresh key per bucket: tests share one redis-server.
    return Bucket(f"test:{uuid.uuid4().hex}", per_second, capacity, tokens)


async def test_a_full_bucket_allows_its_capacity_then_refuses(storage: Storage) -> None:
    b = bucket(1.0, 3)
    results = [await storage.charge([(b, 1)]) for _ in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    assert [b.remaining(r.used[0]) for r in results] == [2, 1, 0, 0]
    # One unit refills in 1 s: the refusal says so.
    assert 0.9 < results[3].retry_after <= 1.0


async def test_charges_are_all_or_nothing(storage: Storage) -> None:
    small, large = bucket(1.0, 1), bucket(1.0, 100)
    assert (await storage.charge([(small, 1), (large, 10)])).allowed
    refused = await storage.charge([(large, 10), (small, 1)])
    assert not refused.allowed
    # The refused request took nothing from the bucket that had room.
    assert large.remaining(refused.used[0]) == 90
    after = await storage.charge([(large, 0)])
    assert large.remaining(after.used[0]) == 90


async def test_waiting_retry_after_is_enough(storage: Storage) -> None:
    b = bucket(20.0, 2)  # one unit per 50 ms
    assert (await storage.charge([(b, 2)])).allowed
    refused = await storage.charge([(b, 1)])
    assert not refused.allowed
    await asyncio.sleep(refused.retry_after + 0.01)
    assert (await storage.charge([(b, 1)])).allowed


async def test_refunds_never_exceed_a_full_bucket(storage: Storage) -> None:
    b = bucket(1.0, 100, tokens=True)
    assert (await storage.charge([(b, 30)])).allowed
    refund = await storage.charge([(b, -1000)], force=True)
    assert refund.allowed
    assert b.remaining(refund.used[0]) == 100
    assert refund.used[0] == 0
    # A refund does not create credit: still only the capacity fits.
    assert (await storage.charge([(b, 100)])).allowed
    assert not (await storage.charge([(b, 1)])).allowed


async def test_forced_overuse_leaves_remaining_at_zero_not_negative(storage: Storage) -> None:
    b = bucket(10.0, 100, tokens=True)
    assert (await storage.charge([(b, 90)])).allowed
    over = await storage.charge([(b, 60)], force=True)  # usage exceeded the reservation
    assert over.allowed
    assert b.remaining(over.used[0]) == 0
    assert over.used[0] > 10.0  # the debt is paid back before anything fits
    refused = await storage.charge([(b, 1)])
    assert not refused.allowed
    assert refused.retry_after > 5.0


async def test_a_charge_larger_than_capacity_is_refused(storage: Storage) -> None:
    b = bucket(1.0, 10, tokens=True)
    refused = await storage.charge([(b, 11)])
    assert not refused.allowed
    assert b.remaining(refused.used[0]) == 10


async def test_concurrent_charges_never_oversubscribe(storage: Storage) -> None:
    b = bucket(0.001, 10)  # no meaningful refill during the test
    results = await asyncio.gather(*(storage.charge([(b, 1)]) for _ in range(40)))
    assert sum(r.allowed for r in results) == 10


async def test_adjust_takes_and_gives_back_unconditionally(storage: Storage) -> None:
    b = bucket(1.0, 100, tokens=True)
    await storage.adjust([b], 150)  # more than the whole budget: a debt
    assert b.remaining((await storage.charge([(b, 0)])).used[0]) == 0
    await storage.adjust([b], -120)
    assert b.remaining((await storage.charge([(b, 0)])).used[0]) == 70
    await storage.adjust([b], -1000)  # never beyond full
    assert b.remaining((await storage.charge([(b, 0)])).used[0]) == 100


async def test_reset_counts_down_to_full(storage: Storage) -> None:
    b = bucket(10.0, 10)
    first = await storage.charge([(b, 5)])
    assert 0.45 < first.used[0] <= 0.5
    await asyncio.sleep(0.2)
    later = await storage.charge([(b, 0)])
    assert later.used[0] < first.used[0] - 0.1


@pytest.mark.redis
async def test_unreachable_redis_raises_storage_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = sock.getsockname()[1]
        store = RedisStorage(f"redis://127.0.0.1:{port}/0", timeout=0.2)
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            await store.charge([(bucket(1.0, 1), 1)])
        assert time.monotonic() - started < 2.0
        await store.aclose()


def _charge_in_child(path: str, key: str, count: int, out: list[int]) -> None:
    """Charge `count` requests of one bucket from another process (the other worker)."""
    import multiprocessing as mp

    def run(queue: mp.Queue[int]) -> None:
        async def go() -> int:
            store = SharedFileStorage(path)
            b = Bucket(key, 1 / 60, 10)
            allowed = sum([(await store.charge([(b, 1)])).allowed for _ in range(count)])
            await store.aclose()
            return allowed

        queue.put(asyncio.run(go()))

    ctx = mp.get_context("fork")
    queue: mp.Queue[int] = ctx.Queue()
    child = ctx.Process(target=run, args=(queue,))
    child.start()
    out.append(queue.get(timeout=30))
    child.join(30)


async def test_the_shared_file_is_one_limit_across_processes(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "ratelimit.table")
    here = SharedFileStorage(path)
    b = Bucket("box:requests", 1 / 60, 10)  # 10 at once, one more a minute
    allowed = sum([(await here.charge([(b, 1)])).allowed for _ in range(4)])
    there: list[int] = []
    await asyncio.to_thread(_charge_in_child, path, b.key, 10, there)
    assert (allowed, there) == (4, [6])  # the other process saw the 4 this one took
    assert not (await here.charge([(b, 1)])).allowed
    await here.aclose()


async def test_a_crowded_shared_table_keeps_every_key_it_can(tmp_path: pathlib.Path) -> None:
    # More live keys than one probe chain holds still each get a bucket of their own; the
    # table never refuses a key, and keys that fit are exact.
    store = SharedFileStorage(tmp_path / "t")
    buckets = [Bucket(f"k{i}", 1 / 60, 2) for i in range(3000)]
    assert all([(await store.charge([(b, 2)])).allowed for b in buckets])
    refused = [not (await store.charge([(b, 1)])).allowed for b in buckets]
    assert all(refused)
    await store.aclose()
