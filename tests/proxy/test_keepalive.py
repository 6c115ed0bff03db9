"""Pooled upstream connections: reused while fresh, never raced against the server's close."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import orjson
import pytest

from tests.conftest import ProxyFactory
from tests.fakes.vllm import FakeVLLM
from tests.proxy.helpers import CHAT_PATH, chat

CONCURRENCY = 50
WHOLE = orjson.dumps(chat(tokens=2))
STREAM = orjson.dumps(chat(tokens=2, stream=True))


async def burst(
    session: aiohttp.ClientSession,
    url: str,
    n: int,
    outcomes: Counter[str],
    concurrency: int = CONCURRENCY,
) -> None:
    """`n` requests, half of them streams, at most `concurrency` at a time."""
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        stream = i % 2 == 0
        async with limit:
            try:
                async with session.post(
                    url,
                    data=STREAM if stream else WHOLE,
                    headers={"content-type": "application/json"},
                ) as r:
                    body = await r.read()
            except aiohttp.ClientError as exc:
                outcomes[type(exc).__name__] += 1
                return
        complete = body.endswith(b"data: [DONE]\n\n") if stream else b'"choices"' in body
        outcomes[str(r.status) if complete else f"{r.status} {body[:200]!r}"] += 1

    await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.slow
async def test_1000_requests_on_connections_idle_about_5s(
    fresh_fake: FakeVLLM, proxy: ProxyFactory
) -> None:
    # The fake closes idle connections after 5 s, like uvicorn under vLLM; the proxy's pool
    # must let them go first (upstream.keepalive_expiry, 4 s by default) and never send on a
    # connection the server is closing.
    assert fresh_fake.keepalive_timeout == 5.0
    url = proxy(fresh_fake) + CHAT_PATH
    outcomes: Counter[str] = Counter()
    # Our own connections to the proxy expire well before uvicorn's 5 s: any error seen here
    # comes from the proxy's side.
    connector = aiohttp.TCPConnector(limit=CONCURRENCY, keepalive_timeout=2.0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await burst(session, url, 400, outcomes)
        opened = fresh_fake.seen.connections
        assert opened >= 10
        # Idle below the pool's expiry: pooled connections serve the next round (at a
        # concurrency the pool already covers, so no new connection is needed).
        await asyncio.sleep(3.0)
        await burst(session, url, 300, outcomes, concurrency=10)
        assert fresh_fake.seen.connections == opened, "pooled connections were not reused"
        # Idle right at the server's keep-alive timeout: the race a pool must not lose.
        await asyncio.sleep(5.0)
        await burst(session, url, 300, outcomes)
    assert outcomes == Counter({"200": 1000})
    assert fresh_fake.seen.connections > opened, "connections past their expiry were reused"
