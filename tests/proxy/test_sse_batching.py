"""A client that is behind gets the events buffered meanwhile in one write, not one each.

Relayed at the app's ASGI edge, with a `send` that takes as long as a slow client's socket
takes to drain (uvicorn's send awaits exactly that when its transport is paused): the events
the engine sent in the meantime leave together, whole and in order.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from proxy.http.app import create_app
from proxy.runtime import load
from tests.fakes.harness import proxy_config
from tests.fakes.vllm import FakeVLLM
from tests.proxy.helpers import chat, events


async def _serve_one(app: Any, body: dict[str, Any], drain: float) -> list[bytes]:
    """Run the app's lifespan and one request; the body of every write the app made."""
    lifespan: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    started = asyncio.Event()

    async def life_receive() -> dict[str, Any]:
        return await lifespan.get()

    async def life_send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()

    await lifespan.put({"type": "lifespan.startup"})
    life = asyncio.create_task(app({"type": "lifespan"}, life_receive, life_send))
    await asyncio.wait_for(started.wait(), 10)
    raw = orjson.dumps(body)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(raw))],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    sent = False
    writes: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            writes.append(message["body"])
            await asyncio.sleep(drain)  # the client's socket takes this long to take it

    try:
        await app(scope, receive, send)
    finally:
        await lifespan.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(life, 10)
    return writes


async def test_a_client_that_is_behind_gets_the_buffered_events_in_one_write(
    fake: FakeVLLM,
) -> None:
    app = create_app(load.from_dict(proxy_config(fake.base_url)))
    body = chat(tokens=200, stream=True, fake={"token_delay": 0.001})
    writes = await _serve_one(app, body, drain=0.03)
    relayed = events(b"".join(writes))
    # role, 200 tokens, [DONE]: every event, whole and in order
    assert len(relayed) == 202 and relayed[-1] == b"[DONE]"
    contents = [orjson.loads(e)["choices"][0]["delta"].get("content") for e in relayed[1:-1]]
    assert all(c is not None for c in contents)
    # ~0.2 s of events against 30 ms per write: a handful of writes, each of many events.
    assert len(writes) < 40, len(writes)
    assert max(w.count(b"\n\n") for w in writes) >= 10


async def test_a_client_that_keeps_up_gets_each_event_as_it_comes(fake: FakeVLLM) -> None:
    app = create_app(load.from_dict(proxy_config(fake.base_url)))
    body = chat(tokens=20, stream=True, fake={"token_delay": 0.02})
    writes = await _serve_one(app, body, drain=0.0)
    # Nothing waits for company: an event that arrives alone leaves alone (no added latency).
    assert len(writes) >= 20
    assert events(b"".join(writes))[-1] == b"[DONE]"
