"""Pooled upstream connections: reused while fresh, never raced against the server's close."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from tests.conftest import ProxyFactory
from tests.fakes.vllm import FakeVLLM
from tests.proxy.helpers import CHAT_PATH, chat

CONCURRENCY = 50
PER_ROUND = 250


async def burst(client: httpx.AsyncClient, statuses: Counter[object]) -> None:
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        async with limit:
            try:
                r = await client.post(CHAT_PATH, json=chat(tokens=2, stream=i % 2 == 0))
                ok = r.status_code == 200 and (i % 2 or r.content.endswith(b"[DONE]\n\n"))
                statuses[r.status_code if ok else f"{r.status_code} {r.content[:200]!r}"] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

    await asyncio.gather(*(one(i) for i in range(PER_ROUND)))


@pytest.mark.slow
async def test_1000_requests_on_connections_idle_about_5s(
    fresh_fake: FakeVLLM, proxy: ProxyFactory
) -> None:
    # The fake closes idle connections after 5 s, like uvicorn under vLLM; the proxy's pool
    # must let them go first (keepalive_expiry 4 s by default) and never send on a dead one.
    assert fresh_fake.keepalive_timeout == 5.0
    base = proxy(fresh_fake)
    statuses: Counter[object] = Counter()
    # Our own client keeps its connections to the proxy below uvicorn's 5 s, so any error
    # seen here comes from the proxy's side.
    limits = httpx.Limits(max_connections=CONCURRENCY, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        await burst(client, statuses)
        opened = fresh_fake.seen.connections
        # Idle below the pool's expiry: the same connections serve the next round.
        await asyncio.sleep(3.0)
        await burst(client, statuses)
        assert fresh_fake.seen.connections < opened + 5, "pooled connections were not reused"
        for idle in (5.0, 4.5):
            # Around the server's own keep-alive timeout: the race a proxy pool must avoid.
            await asyncio.sleep(idle)
            await burst(client, statuses)
    assert statuses == Counter({200: 4 * PER_ROUND})
    assert fresh_fake.seen.connections > opened, "expired connections were reused"
