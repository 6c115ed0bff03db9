"""The `"fake"` fault knobs on the new routes, each in its route's own framing, and what the fake
records about them: the faults the proxy is tested against must be real on every API."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.sse_read import typed_events
from tests.fakes.vllm import FakeVLLM, token_text

HELLO = [{"role": "user", "content": "Hello"}]
# (path, a non-streaming request body) per new inference route.
REQUESTS = {
    "responses": ("/v1/responses", {"model": "tiny", "input": "Hi", "max_output_tokens": 4}),
    "messages": ("/v1/messages", {"model": "tiny", "max_tokens": 4, "messages": HELLO}),
    "count_tokens": ("/v1/messages/count_tokens", {"model": "tiny", "messages": HELLO}),
    "embeddings": ("/v1/embeddings", {"model": "tiny", "input": ["a", "b"]}),
    "score": ("/v1/score", {"model": "tiny", "text_1": "q", "text_2": ["a", "b"]}),
    "rerank": ("/v1/rerank", {"model": "tiny", "query": "q", "documents": ["a", "b"]}),
}
STREAMS = ("responses", "messages")


@pytest.fixture
def client(fake: FakeVLLM) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.base_url, timeout=10) as c:
        yield c


def post(client: httpx.Client, name: str, fault: dict[str, Any], **extra: Any) -> httpx.Response:
    path, body = REQUESTS[name]
    return client.post(path, json={**body, **extra, "fake": fault}, headers={"X-Request-ID": name})


@pytest.mark.parametrize("name", list(REQUESTS))
def test_status_delay_and_fail_first(client: httpx.Client, name: str) -> None:
    canned = post(client, name, {"status": 503, "body": {"e": 1}})
    assert (canned.status_code, canned.json()) == (503, {"e": 1})
    started = time.monotonic()
    assert post(client, name, {"first_byte_delay": 0.3}).status_code == 200
    assert time.monotonic() - started >= 0.3
    flaky = {"fail_first": 1, "fail_with": {"status": 502, "body": "down"}}
    assert post(client, name, flaky).status_code == 502
    assert post(client, name, flaky).status_code == 200


def test_defaults_reach_responses_retrieve_and_cancel(fake: FakeVLLM, client: httpx.Client) -> None:
    made = post(client, "responses", {}).json()
    fake.defaults = {"status": 429, "body": "slow down"}
    assert client.get(f"/v1/responses/{made['id']}").status_code == 429
    assert client.post(f"/v1/responses/{made['id']}/cancel").status_code == 429
    assert client.get("/health").status_code == 200  # the probes never fail


@pytest.mark.parametrize("name", list(REQUESTS))
def test_never_answer_is_recorded_as_cancelled(fake: FakeVLLM, name: str) -> None:
    with httpx.Client(base_url=fake.base_url, timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        post(c, name, {"never_answer": True})
    assert fake.wait(lambda r: len(r.cancelled) == 1)
    assert (fake.seen.cancelled[0].path, fake.seen.cancelled[0].request_id) == (
        REQUESTS[name][0],
        name,
    )
    assert fake.wait(lambda r: r.inflight == 0)


@pytest.mark.parametrize("name", STREAMS)
def test_reset_and_hang_mid_stream(fake: FakeVLLM, client: httpx.Client, name: str) -> None:
    with pytest.raises(httpx.ReadError, match="reset"):
        post(client, name, {"reset_after_events": 3}, stream=True)
    path, body = REQUESTS[name]
    hanging = {**body, "stream": True, "fake": {"hang_after_events": 2}}
    with (
        httpx.Client(base_url=fake.base_url, timeout=0.5) as c,
        c.stream("POST", path, json=hanging) as r,
    ):
        pieces = r.iter_bytes()
        got = b""
        while got.count(b"\n\n") < 2:
            got += next(pieces)
        assert fake.seen.inflight == 1  # an inference request, still being answered
        with pytest.raises(httpx.ReadTimeout):
            got += b"".join(pieces)
        assert len(typed_events(got)) == 2
    assert fake.wait(lambda r: r.inflight == 0)


@pytest.mark.parametrize("name", STREAMS)
def test_split_every_byte_changes_nothing_but_the_pieces(client: httpx.Client, name: str) -> None:
    whole = post(client, name, {}, stream=True)
    split = post(client, name, {"split": "every_byte"}, stream=True)
    assert [n for n, _ in typed_events(split.content)] == [
        n for n, _ in typed_events(whole.content)
    ]
    assert len(split.content) == len(whole.content)
    if name == "messages":  # no random ids or clocks in it: byte for byte the same
        assert split.content == whole.content


@pytest.mark.parametrize("name", STREAMS)
def test_token_delay_and_padding(client: httpx.Client, name: str) -> None:
    started = time.monotonic()
    r = post(client, name, {"token_delay": 0.05, "token_padding": 1000}, stream=True)
    got = typed_events(r.content)
    assert time.monotonic() - started >= 0.05 * (len(got) - 1)
    key = "response.output_text.delta" if name == "responses" else "content_block_delta"
    texts = [d["delta"] if name == "responses" else d["delta"]["text"] for n, d in got if n == key]
    assert texts == [token_text(i, "." * 1000) for i in range(4)]


def test_every_new_inference_route_is_recorded(fake: FakeVLLM, client: httpx.Client) -> None:
    for name in REQUESTS:
        post(client, name, {})
    client.get("/v1/responses/resp_x")
    inference = [s.path for s in fake.completions]
    assert inference == [REQUESTS[n][0] for n in REQUESTS if n != "count_tokens"]
    assert fake.seen.heads_sent == len(inference)
    assert fake.requests_to("/v1/messages/count_tokens")[0].body["model"] == "tiny"


def test_client_gone_mid_stream_is_cancelled(fake: FakeVLLM) -> None:
    path, body = REQUESTS["responses"]
    data = (
        b'{"model":"tiny","input":"Hi","max_output_tokens":50,"stream":true,'
        b'"fake":{"token_delay":0.05}}'
    )
    assert body["model"] == "tiny"
    with socket.create_connection(("127.0.0.1", fake.port)) as sock:
        head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(data)}\r\n\r\n"
        sock.sendall(head.encode() + data)
        assert fake.wait(lambda r: r.inflight == 1)
        sock.recv(4096)
    assert fake.wait(lambda r: len(r.cancelled) == 1)
    gone = fake.seen.cancelled[0]
    assert gone.path == path and 0 < gone.events_sent < 50
    assert fake.wait(lambda r: r.inflight == 0)
