"""The proxy in front of the fake vLLM over real sockets: relay, disconnects, faults, timeouts."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import openai
import orjson
import pytest

from tests.conftest import ProxyFactory
from tests.fakes.vllm import FakeVLLM, Record, answer_text
from tests.proxy.helpers import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    RawClient,
    chat,
    events,
    without_created,
)


def stream_body(
    base_url: str, data: dict[str, object], rid: str = "t-1", path: str = CHAT_PATH
) -> httpx.Response:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        r = client.post(path, json=data, headers={"X-Request-ID": rid})
        r.read()
        return r


def error_of(event: bytes) -> dict[str, object]:
    data = orjson.loads(event)
    assert set(data) == {"error"}, data
    error: dict[str, object] = data["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def cancelled_once(record: Record) -> bool:
    return len(record.cancelled) >= 1


# -- relay -----------------------------------------------------------------------------------


@pytest.mark.parametrize("usage", [False, True])
def test_stream_relayed_with_sse_headers_and_vllm_events(
    fake: FakeVLLM, proxy: ProxyFactory, usage: bool
) -> None:
    base = proxy()
    data = chat(tokens=5, stream=True)
    if usage:
        data["stream_options"] = {"include_usage": True}
    via_proxy = stream_body(base, data)
    direct = stream_body(fake.base_url, {**data, "model": "tiny"})

    assert via_proxy.status_code == 200
    assert via_proxy.headers["content-type"].startswith("text/event-stream")
    assert via_proxy.headers["cache-control"] == "no-cache"
    assert via_proxy.headers["x-accel-buffering"] == "no"
    got = [without_created(e) for e in events(via_proxy.content)]
    assert got == [without_created(e) for e in events(direct.content)]
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert got[-1] == b"[DONE]"
    assert ("usage" in got[-2]) is usage
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in got[:-1] if e["choices"])
    assert via_proxy.content.endswith(b"data: [DONE]\n\n")


def test_non_stream_relayed(fake: FakeVLLM, proxy: ProxyFactory) -> None:
    base = proxy()
    with httpx.Client(base_url=base) as client:
        r = client.post(COMPLETIONS_PATH, json={"model": "tiny", "prompt": "x", "max_tokens": 3})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == answer_text(3)
    assert r.json()["usage"]["completion_tokens"] == 3
    (seen,) = fake.completions
    assert seen.body["prompt"] == "x"
    assert "authorization" not in seen.headers


def test_bytes_relayed_as_they_arrive(fake: FakeVLLM, proxy: ProxyFactory) -> None:
    base = proxy()
    data = chat(tokens=6, stream=True, fake={"token_delay": 0.2})
    arrivals: list[tuple[float, bytes]] = []
    with httpx.Client(base_url=base, timeout=30) as client:
        start = time.monotonic()
        with client.stream("POST", CHAT_PATH, json=data) as r:
            for chunk in r.iter_raw():
                arrivals.append((time.monotonic() - start, chunk))
    body = b"".join(c for _, c in arrivals)
    assert body.endswith(b"data: [DONE]\n\n")
    first_content = next(t for t, c in arrivals if b'"Hello"' in c or b"Hello" in c)
    total = arrivals[-1][0]
    # The fake spends 6 x 0.2 s producing the answer: the first token must not wait for it.
    assert total >= 1.0
    assert first_content < total - 0.6, arrivals


# -- client disconnects cancel the upstream ---------------------------------------------------


def test_disconnect_mid_stream_cancels_upstream_within_1s(
    fake: FakeVLLM, proxy: ProxyFactory
) -> None:
    base = proxy()
    with RawClient(base) as client:
        client.post_json(CHAT_PATH, chat(tokens=5000, stream=True, fake={"token_delay": 0.02}))
        client.read_until(b"data: ", count=3)
        closed_at = client.close()
    assert fake.wait(cancelled_once, 2.0), "the upstream request was never cancelled"
    (gone,) = fake.seen.cancelled
    assert gone.path == CHAT_PATH
    assert gone.at - closed_at < 1.0
    assert gone.events_sent < 200
    assert len(fake.completions) == 1  # never retried once the client has left


@pytest.mark.parametrize(
    ("stream", "fault"),
    [
        (True, {"never_answer": True}),
        (False, {"never_answer": True}),
        (True, {"first_byte_delay": 60}),
        (False, {"first_byte_delay": 60}),
        (True, {"first_event_delay": 60}),  # headers sent, prefill still running
    ],
    ids=["stream-silent", "whole-silent", "stream-slow", "whole-slow", "stream-headers-only"],
)
def test_disconnect_before_first_byte_cancels_upstream_within_1s(
    fake: FakeVLLM, proxy: ProxyFactory, stream: bool, fault: dict[str, object]
) -> None:
    base = proxy()
    with RawClient(base) as client:
        client.post_json(CHAT_PATH, chat(stream=stream, fake=fault))
        assert fake.wait(lambda r: r.inflight == 1, 5.0)
        if "first_event_delay" in fault:
            # The upstream sent its headers; the proxy holds its own until the first event (a
            # failure before it can still be retried), so the client has nothing yet.
            assert fake.wait(lambda r: r.heads_sent == 1, 5.0)
        closed_at = client.close()
    assert fake.wait(cancelled_once, 2.0), "the upstream request was never cancelled"
    (gone,) = fake.seen.cancelled
    assert gone.events_sent == 0
    assert gone.at - closed_at < 1.0
    assert fake.seen.inflight == 0
    assert len(fake.completions) == 1  # never retried once the client has left


# -- failures after and before the first byte --------------------------------------------------


def test_reset_mid_stream_ends_with_error_event_and_no_done(
    fake: FakeVLLM, proxy: ProxyFactory
) -> None:
    base = proxy()
    r = stream_body(base, chat(tokens=10, stream=True, fake={"reset_after_events": 3}))
    assert r.status_code == 200
    got = events(r.content)
    assert len(got) == 4
    assert [without_created(e)["choices"][0]["index"] for e in got[:3]] == [0, 0, 0]
    assert error_of(got[-1])["code"] == "upstream_stream_broken"
    assert b"[DONE]" not in r.content
    assert len(fake.completions) == 1  # no retry once bytes reached the client


def test_reset_mid_stream_makes_the_openai_sdk_raise(fake: FakeVLLM, proxy: ProxyFactory) -> None:
    base = proxy()
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)
    with client:
        stream = client.chat.completions.create(
            **chat(tokens=10, stream=True, extra_body={"fake": {"reset_after_events": 3}})
        )
        seen = []
        with pytest.raises(openai.APIError):
            for chunk in stream:
                seen.append(chunk)
    assert len(seen) == 3


def test_upstream_error_event_then_done_forwarded_and_sdk_raises(
    fake: FakeVLLM, proxy: ProxyFactory
) -> None:
    base = proxy()
    fault = {"error_event_after": 2}
    r = stream_body(base, chat(tokens=10, stream=True, fake=fault))
    got = events(r.content)
    assert got[-1] == b"[DONE]"
    assert error_of(got[-2])["message"] == "fake engine error"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)
    with client:
        stream = client.chat.completions.create(
            **chat(tokens=10, stream=True, extra_body={"fake": fault})
        )
        with pytest.raises(openai.APIError, match="fake engine error"):
            for _ in stream:
                pass


async def test_slow_first_byte_has_no_spurious_timeout(fake: FakeVLLM, proxy: ProxyFactory) -> None:
    # connect (and pool) timeouts are 1 s: a 3 s prefill must not trip any of them.
    base = proxy(upstream={"connect_timeout": 1.0})
    slow = {"first_byte_delay": 3.0}
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        whole, streamed, headers_first = await asyncio.gather(
            client.post(CHAT_PATH, json=chat(tokens=3, fake=slow)),
            client.post(CHAT_PATH, json=chat(tokens=3, stream=True, fake=slow)),
            client.post(CHAT_PATH, json=chat(tokens=3, stream=True, fake={"first_event_delay": 3})),
        )
    assert whole.status_code == 200
    assert whole.json()["choices"][0]["message"]["content"] == answer_text(3)
    for r in (streamed, headers_first):
        assert r.status_code == 200
        assert r.content.endswith(b"data: [DONE]\n\n")
        assert b'"error"' not in r.content


@pytest.mark.parametrize("stream", [True, False])
def test_first_byte_timeout_is_504_and_cancels_upstream(
    fake: FakeVLLM, proxy: ProxyFactory, stream: bool
) -> None:
    base = proxy(upstream={"first_byte_timeout": 0.5})
    with httpx.Client(base_url=base, timeout=10) as client:
        start = time.monotonic()
        r = client.post(CHAT_PATH, json=chat(stream=stream, fake={"never_answer": True}))
        elapsed = time.monotonic() - start
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert 0.4 < elapsed < 3.0
    assert fake.wait(cancelled_once, 2.0)


def test_first_event_timeout_after_upstream_headers_is_a_504(
    fake: FakeVLLM, proxy: ProxyFactory
) -> None:
    # The proxy sends its headers with the first event (proxy.upstream.forward peeks it), so a
    # stream
    # whose first event never comes still gets a proper status, not a 200 with an error event.
    base = proxy(upstream={"first_byte_timeout": 0.5})
    r = stream_body(base, chat(stream=True, fake={"first_event_delay": 30}))
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert fake.wait(cancelled_once, 2.0)


def test_stream_idle_timeout_ends_with_error_event_and_frees_upstream(
    fake: FakeVLLM, proxy: ProxyFactory
) -> None:
    base = proxy(upstream={"stream_idle_timeout": 0.5})
    start = time.monotonic()
    r = stream_body(base, chat(tokens=10, stream=True, fake={"hang_after_events": 3}))
    elapsed = time.monotonic() - start
    got = events(r.content)
    assert len(got) == 4
    assert error_of(got[-1])["code"] == "upstream_timeout"
    assert b"[DONE]" not in r.content
    assert elapsed < 3.0
    assert fake.wait(cancelled_once, 2.0), "the silent upstream was not closed"
    assert fake.seen.inflight == 0


def test_slow_tokens_within_the_idle_timeout_are_fine(fake: FakeVLLM, proxy: ProxyFactory) -> None:
    base = proxy(upstream={"stream_idle_timeout": 1.0})
    r = stream_body(base, chat(tokens=6, stream=True, fake={"token_delay": 0.2}))
    assert r.content.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in r.content


@pytest.mark.parametrize("stream", [True, False])
def test_upstream_errors_before_the_stream_keep_their_shape(
    fake: FakeVLLM, proxy: ProxyFactory, stream: bool
) -> None:
    base = proxy()
    vllm_400 = (
        b'{"error":{"message":"max_tokens=5000 cannot be greater than max_model_len=2048.",'
        b'"type":"BadRequestError","param":null,"code":400}}'
    )
    leak = 'Traceback (most recent call last):\n  File "/srv/vllm/engine.py"\nRuntimeError'
    with httpx.Client(base_url=base, timeout=10) as client:
        bad = client.post(
            CHAT_PATH, json=chat(stream=stream, fake={"status": 400, "body": vllm_400.decode()})
        )
        broken = client.post(
            CHAT_PATH, json=chat(stream=stream, fake={"status": 500, "body": leak})
        )
    assert bad.status_code == 400
    assert bad.content == vllm_400
    assert broken.status_code >= 500
    assert broken.headers["content-type"].startswith("application/json")
    assert set(broken.json()["error"]) == {"message", "type", "param", "code"}
    for word in ("Traceback", "engine.py", "RuntimeError", "/srv"):
        assert word not in broken.text


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize("stream", [True, False])
def test_upstream_down_is_502_fast(proxy: ProxyFactory, stream: bool) -> None:
    base = proxy(f"http://127.0.0.1:{closed_port()}")
    with httpx.Client(base_url=base, timeout=10) as client:
        start = time.monotonic()
        r = client.post(CHAT_PATH, json=chat(stream=stream))
        elapsed = time.monotonic() - start
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_unreachable"
    assert elapsed < 1.0


# -- framing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("usage", [False, True])
def test_chunk_boundaries_at_every_byte_offset(
    fake: FakeVLLM, proxy: ProxyFactory, usage: bool
) -> None:
    base = proxy()
    # Tokens 1-4 hold 2-, 3- and 4-byte UTF-8 characters: some cuts fall inside them.
    data = chat(tokens=5, stream=True)
    if usage:
        data["stream_options"] = {"include_usage": True}
    whole = stream_body(base, data, rid="split")
    split = stream_body(
        base, {**data, "fake": {"split": "every_byte", "split_delay": 0.0002}}, rid="split"
    )
    assert [without_created(e) for e in events(split.content)] == [
        without_created(e) for e in events(whole.content)
    ]
    text = split.content.decode()
    assert all(word in text for word in ("wörld", "日本語", "🙂"))
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)
    with client:
        stream = client.chat.completions.create(
            **chat(tokens=5, stream=True, extra_body={"fake": {"split": "every_byte"}})
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == answer_text(5)


async def test_every_two_piece_split_of_a_stream(fake: FakeVLLM, proxy: ProxyFactory) -> None:
    """One cut at each byte offset in turn (with a pause at the cut): identical events."""
    base = proxy()
    data = {"model": "tiny", "prompt": "x", "max_tokens": 2, "stream": True}
    whole = stream_body(base, data, rid="cut", path=COMPLETIONS_PATH)
    assert whole.content.endswith(b"data: [DONE]\n\n")
    expected = [without_created(e) for e in events(whole.content)]

    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        limit = asyncio.Semaphore(64)

        async def one(offset: int) -> None:
            fault = {"split": [offset], "split_delay": 0.001}
            async with limit:
                r = await client.post(
                    COMPLETIONS_PATH, json={**data, "fake": fault}, headers={"X-Request-ID": "cut"}
                )
            assert [without_created(e) for e in events(r.content)] == expected, offset

        # The upstream's body is as long as the relayed one (same events): every offset in it.
        await asyncio.gather(*(one(i) for i in range(1, len(whole.content))))


# -- hostile framing and paths over a real socket ---------------------------------------------


def test_declared_content_length_over_limit_is_413_without_reading(
    fake: FakeVLLM, proxy: ProxyFactory
) -> None:
    base = proxy()
    with RawClient(base, timeout=5) as client:
        client.send("POST", CHAT_PATH, b'{"model":', content_length=10**9)
        status, _, body = client.read_response(within=5)
    assert status == 413
    assert orjson.loads(body)["error"]["code"] == "request_too_large"
    assert fake.completions == []


@pytest.mark.parametrize(
    "target",
    [
        "/tokenize",
        "/detokenize",
        "/metrics",
        "/v1/../tokenize",
        "/v1/%2e%2e/tokenize",
        "/%2e%2e/v1/chat/completions",
        "/v1/chat/completions/../../tokenize",
        "//v1/models",
        "//v1/chat/completions",
        "/v1//chat/completions",
        "/v1/chat/completions%2f",
        "/V1/chat/completions",
        "/v1/chat/completions?x=/../tokenize",
        "http://evil.test/v1/chat/completions",
    ],
)
def test_unknown_raw_paths_are_404_and_nothing_is_forwarded(
    fake: FakeVLLM, proxy: ProxyFactory, target: str
) -> None:
    base = proxy()
    with RawClient(base, timeout=5) as client:
        client.post_json(target, chat())
        status, headers, body = client.read_response(within=5)
    forwarded = [r for r in fake.seen.requests if "x-request-id" in r.headers]
    if target == "/v1/chat/completions?x=/../tokenize":
        # A query string is not part of the path: this is a normal chat request.
        assert status == 200
        assert [r.path for r in forwarded] == [CHAT_PATH]
        return
    if target == "http://evil.test/v1/chat/completions":
        # Absolute-form target: the path is what counts, the host is never used outbound.
        assert status in (200, 400, 404)
        assert all(r.path == CHAT_PATH for r in forwarded)
        return
    assert status in (404, 405), body
    assert headers["content-type"].startswith("application/json")
    assert set(orjson.loads(body)["error"]) == {"message", "type", "param", "code"}
    assert forwarded == []
    assert fake.requests_to("/tokenize") == []
