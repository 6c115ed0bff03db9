"""The fake vLLM itself, directly: the other tests are only as good as its faults are real."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import orjson
import pytest

from engine.client import exposition as prometheus
from tests.fakes.vllm import FakeVLLM, answer_text
from tests.proxy.helpers import CHAT_PATH, COMPLETIONS_PATH, RawClient, chat, events


@pytest.fixture
def client(fake: FakeVLLM) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.base_url, timeout=10) as c:
        yield c


def test_vllm_shapes(fake: FakeVLLM, client: httpx.Client) -> None:
    health = client.get("/health")
    assert (health.status_code, health.content) == (200, b"")
    (model,) = client.get("/v1/models").json()["data"]
    assert (model["id"], model["max_model_len"]) == ("tiny", 2048)
    samples = prometheus.parse(client.get("/metrics").text)
    assert {s.name for s in samples} >= {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    }
    tokens = client.post("/tokenize", json={"prompt": "one two three"}).json()
    assert tokens == {"count": 4, "max_model_len": 2048, "tokens": [0, 1, 2, 3]}
    assert client.post("/tokenize", json={"prompt": "x"}).status_code == 200
    assert client.get("/nope").status_code == 404
    assert client.get(CHAT_PATH).status_code == 405
    missing = client.post(CHAT_PATH, json=chat(model="gpt-4"))
    assert missing.status_code == 404


def test_stream_framing_like_vllm(client: httpx.Client) -> None:
    r = client.post(
        CHAT_PATH, json=chat(tokens=3, stream=True, stream_options={"include_usage": True})
    )
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    got = events(r.content)
    assert got[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in got[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == (
        answer_text(3)
    )
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert r.content.count(b"\n\n") == len(got)


def test_faults(fake: FakeVLLM, client: httpx.Client) -> None:
    split = client.post(
        COMPLETIONS_PATH,
        json={"model": "tiny", "prompt": "x", "stream": True, "fake": {"split": "every_byte"}},
        headers={"X-Request-ID": "same"},
    )
    whole = client.post(
        COMPLETIONS_PATH,
        json={"model": "tiny", "prompt": "x", "stream": True},
        headers={"X-Request-ID": "same"},
    )
    assert len(split.content) == len(whole.content)
    assert events(split.content)[-1] == b"[DONE]"
    with pytest.raises(httpx.ReadError, match="reset"):  # a real RST, not a clean close
        client.post(CHAT_PATH, json=chat(stream=True, fake={"reset_after_events": 2}))
    erroring = client.post(CHAT_PATH, json=chat(stream=True, fake={"error_event_after": 1}))
    assert b'"error"' in events(erroring.content)[-2]
    status = client.post(CHAT_PATH, json=chat(fake={"status": 503, "body": {"e": 1}}))
    assert (status.status_code, status.json()) == (503, {"e": 1})
    fake.defaults = {"status": 429, "body": "slow down"}
    assert client.post(CHAT_PATH, json=chat()).status_code == 429


def test_records_cancellation_and_inflight(fake: FakeVLLM) -> None:
    with RawClient(fake.base_url) as raw:
        raw.post_json(CHAT_PATH, chat(stream=True, fake={"hang_after_events": 2}))
        raw.read_until(b"data: ", count=2)
        assert fake.seen.inflight == 1
        raw.close()
    assert fake.wait(lambda r: len(r.cancelled) == 1)
    (gone,) = fake.seen.cancelled
    assert (gone.path, gone.events_sent) == (CHAT_PATH, 2)
    assert fake.seen.inflight == 0
    assert fake.seen.max_inflight == 1
    assert fake.seen.connections == 1
    (seen,) = fake.completions
    assert seen.body["fake"] == {"hang_after_events": 2}


def test_closes_idle_keep_alive_connections() -> None:
    with FakeVLLM(keepalive_timeout=0.2) as fake, RawClient(fake.base_url) as raw:
        raw.send("GET", "/health")
        assert raw.read_response()[0] == 200
        raw.sock.settimeout(5)
        assert raw.sock.recv(1) == b""  # closed by the server, not by our timeout
