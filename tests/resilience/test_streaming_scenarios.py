"""Reliability contract, "Streaming" (scenarios 16-21), with the resilience layer in the path:
besides what the client sees, every test checks the upstream slot is freed and that the breaker
only counted what was the upstream's fault."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import orjson
import pytest

from tests.fakes.vllm import FakeVLLM
from tests.proxy.helpers import CHAT_PATH, RawClient, chat, events
from tests.resilience.conftest import FakeFactory, Gateway, GatewayFactory, config
from tests.vllm_fixtures import free_port


def start(gateway: GatewayFactory, fake: FakeVLLM, **resilience: Any) -> Gateway:
    return gateway(config({"tiny": {"upstreams": [fake.base_url]}}, resilience))


def settle(gw: Gateway) -> None:
    """Wait (bounded) for the proxy to finish its side of a request the client left."""
    deadline = time.monotonic() + 2.0
    while gw.upstream().inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gw.upstream().inflight == 0


def normalized(body: bytes) -> list[Any]:
    out = []
    for e in events(body):
        if e == b"[DONE]":
            out.append("[DONE]")
            continue
        data = orjson.loads(e)
        data.pop("created", None)
        data.pop("id", None)
        out.append(data)
    return out


# 16 ------------------------------------------------------------------------------------------


def test_client_leaving_mid_stream_closes_upstream_within_1s(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = start(gateway, fake)
    with RawClient(gw.base_url) as client:
        client.post_json(CHAT_PATH, chat(tokens=5000, stream=True, fake={"token_delay": 0.02}))
        client.read_until(b"data: ", count=3)
        closed_at = client.close()
    assert fake.wait(lambda r: len(r.cancelled) == 1, 2.0)
    (gone,) = fake.seen.cancelled
    assert gone.at - closed_at < 1.0
    assert gone.events_sent < 200  # the engine stopped generating
    settle(gw)
    assert gw.upstream().breaker.fail_counter == 0


# 17 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault", [{"never_answer": True}, {"first_event_delay": 60}], ids=["silent", "prefill"]
)
def test_client_leaving_during_prefill_cancels_upstream_within_1s(
    fakes: FakeFactory, gateway: GatewayFactory, fault: dict[str, Any]
) -> None:
    fake = fakes()
    gw = start(gateway, fake)
    with RawClient(gw.base_url) as client:
        client.post_json(CHAT_PATH, chat(stream=True, fake=fault))
        assert fake.wait(lambda r: r.inflight == 1, 5.0)
        closed_at = client.close()
    assert fake.wait(lambda r: len(r.cancelled) == 1, 2.0)
    assert fake.seen.cancelled[0].at - closed_at < 1.0
    assert fake.seen.cancelled[0].events_sent == 0
    settle(gw)
    assert gw.upstream().breaker.fail_counter == 0


def test_client_leaving_while_queued_leaves_the_queue_and_sends_nothing(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = start(gateway, fake, backpressure={"max_inflight": 1, "queue_size": 4})
    admission = gw.runtime.routes["tiny"].admission
    with RawClient(gw.base_url) as busy:
        busy.post_json(CHAT_PATH, chat(stream=True, fake={"first_event_delay": 60}))
        assert fake.wait(lambda r: r.inflight == 1, 5.0)
        with RawClient(gw.base_url) as queued:
            queued.post_json(CHAT_PATH, chat(stream=True))
            deadline = time.monotonic() + 2
            while admission.waiting == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert admission.waiting == 1
        deadline = time.monotonic() + 1.0
        while admission.waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        assert admission.waiting == 0
        assert len(fake.completions) == 1
    settle(gw)


# 18 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("retried", [False, True], ids=["first-try", "after-a-retry"])
def test_events_split_at_every_byte_arrive_identical_with_usage(
    fakes: FakeFactory, gateway: GatewayFactory, retried: bool
) -> None:
    fake = fakes()
    gw = start(gateway, fake)
    body = chat(tokens=5, stream=True, stream_options={"include_usage": True})
    direct = httpx.post(fake.base_url + CHAT_PATH, json=body, timeout=10)
    fault: dict[str, Any] = {"split": "every_byte"}
    if retried:
        fault |= {"fail_first": 1}  # a 502 first
    r = httpx.post(gw.base_url + CHAT_PATH, json={**body, "fake": fault}, timeout=10)
    assert r.status_code == 200
    assert normalized(r.content) == normalized(direct.content)
    usage = [e for e in normalized(r.content) if isinstance(e, dict) and e.get("usage")]
    assert len(usage) == 1
    assert usage[0]["usage"]["completion_tokens"] == 5
    assert gw.upstream().failures == int(retried)


# 19 ------------------------------------------------------------------------------------------


def test_upstream_error_event_is_forwarded_and_the_sdk_raises(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = start(gateway, fake)
    client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        stream=True,
        extra_body={"fake": {"error_event_after": 2}},
    )
    seen = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            seen.append(chunk)
    assert len(seen) == 2
    assert len(fake.completions) == 1  # after the first byte: never retried
    settle(gw)


# 20 ------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def fake_process() -> Iterator[str]:
    """The fake engine in its own process: its buffers stay out of this process's memory."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.vllm", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        assert b"listening" in proc.stdout.readline()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_a_slow_reader_holds_no_memory_and_others_are_unaffected(
    fake_process: str, gateway: GatewayFactory
) -> None:
    gw = gateway(config({"tiny": {"upstreams": [fake_process]}}))
    tokens = 200_000  # ~35 MB of events, far more than the socket buffers in between
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=10) as client:
        await client.post(CHAT_PATH, json=chat(tokens=2000, stream=True))  # warm up
        before = rss_bytes()
        url = urlsplit(gw.base_url)
        assert url.hostname is not None and url.port is not None
        slow = socket.create_connection((url.hostname, url.port), timeout=30)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        try:
            payload = orjson.dumps(chat(tokens=tokens, stream=True))
            slow.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                b"application/json\r\ncontent-length: %d\r\n\r\n%b" % (len(payload), payload)
            )
            await asyncio.sleep(2.0)  # the slow client reads nothing
            began = time.monotonic()
            others = await asyncio.gather(
                *(client.post(CHAT_PATH, json=chat(tokens=20, stream=True)) for _ in range(5))
            )
            assert time.monotonic() - began < 3.0
            for r in others:
                assert r.status_code == 200
                assert events(r.content)[-1] == b"[DONE]"
            # The proxy stopped reading the upstream instead of buffering the stream itself.
            assert rss_bytes() - before < 12_000_000
            received = await asyncio.to_thread(read_to_done, slow)
        finally:
            slow.close()
    assert received.count(b"data: ") == tokens + 2
    assert gw.upstream().inflight == 0


def read_to_done(sock: socket.socket) -> bytes:
    parts: list[bytes] = []
    tail = b""
    while not tail.endswith(b"data: [DONE]\n\n\r\n"):
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        parts.append(chunk)
        tail = (tail + chunk)[-64:]
        if tail.endswith(b"0\r\n\r\n"):
            break
    return b"".join(parts)


# 21 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("asked", [True, False])
def test_usage_chunk_passes_through_only_when_asked_also_after_a_retry(
    fakes: FakeFactory, gateway: GatewayFactory, asked: bool
) -> None:
    fake = fakes()
    gw = start(gateway, fake)
    body = chat(tokens=3, stream=True, fake={"fail_first": 1})
    if asked:
        body["stream_options"] = {"include_usage": True}
    r = httpx.post(gw.base_url + CHAT_PATH, json=body, timeout=10)
    assert r.status_code == 200
    usage = [e for e in normalized(r.content) if isinstance(e, dict) and "usage" in e]
    if asked:
        assert len(usage) == 1
        assert usage[0]["usage"]["completion_tokens"] == 3
        assert usage[0]["choices"] == []
    else:
        assert usage == []
    # Both attempts asked the engine for usage (the proxy reconciles token limits from it).
    assert all(s.body["stream_options"] == {"include_usage": True} for s in fake.completions)
