"""How a stream may end: only with its route's terminal event; anything else is a broken stream.

A stream framed by the connection's end, or whose chunked body ends cleanly, but that never sent
`data: [DONE]`, was cut short by the engine (it died, or something between cut it): the client
gets an error event instead of a clean end, the breaker counts it, and the metrics say
`stream_failed`. An event that never ends is bounded too: the proxy holds at most
`upstream.max_event_bytes` of it, then ends the stream and closes the engine request.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy.upstream.sse import EventTooLarge, Framer
from tests.fakes.vllm import FakeVLLM
from tests.proxy.helpers import CHAT_PATH, chat, events
from tests.resilience.conftest import FakeFactory, Gateway, GatewayFactory, config


def start(gateway: GatewayFactory, fake: FakeVLLM, **upstream: Any) -> Gateway:
    return gateway(
        config(
            {"tiny": {"upstreams": [fake.base_url]}},
            {"breaker": {"fail_max": 1}, "retry": {"attempts": 1}},
            upstream={"health_interval": 30.0, "metrics_interval": 30.0, **upstream},
        )
    )


def last_error(body: bytes) -> dict[str, Any]:
    data = events(body)
    assert data and data[-1] != b"[DONE]", data[-3:]
    error = orjson.loads(data[-1])["error"]
    assert isinstance(error, dict)
    return error


@pytest.mark.parametrize("framing", ["chunked", "eof"])
def test_a_stream_without_done_is_broken_for_the_client_and_the_breaker(
    fakes: FakeFactory, gateway: GatewayFactory, framing: str
) -> None:
    fake = fakes()
    gw = start(gateway, fake)
    fault = {"end_after_events": 3, "framing": framing}
    r = httpx.post(gw.base_url + CHAT_PATH, json=chat(8, stream=True, fake=fault), timeout=10)
    assert r.status_code == 200
    assert len(events(r.content)) == 4  # the three events relayed, then the error
    assert last_error(r.content)["code"] == "upstream_stream_broken"
    breaker = gw.upstream().breaker
    assert breaker.current_state == "open"  # fail_max 1: the engine's fault was counted


def test_the_openai_sdk_raises_on_a_stream_cut_without_done(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = start(gateway, fake)
    client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        stream=True,
        extra_body={"fake": {"end_after_events": 2, "framing": "eof"}},
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_a_stream_framed_by_the_connection_end_with_done_is_fine(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = start(gateway, fake)
    body = chat(5, stream=True, fake={"framing": "eof"})
    r = httpx.post(gw.base_url + CHAT_PATH, json=body, timeout=10)
    assert events(r.content)[-1] == b"[DONE]"
    assert gw.upstream().breaker.current_state == "closed"


def test_an_event_that_never_ends_is_cut_at_the_bound_and_the_engine_request_closed(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = start(gateway, fake, max_event_bytes=1024 * 1024)
    began = time.monotonic()
    body = chat(4, stream=True, fake={"endless_event": 40 * 1024 * 1024, "flow_control": True})
    r = httpx.post(gw.base_url + CHAT_PATH, json=body, timeout=30)
    assert time.monotonic() - began < 10
    assert r.status_code == 200
    assert len(r.content) < 2 * 1024 * 1024  # the partial event was never relayed
    assert last_error(r.content)["code"] == "upstream_stream_broken"
    deadline = time.monotonic() + 5
    while not fake.seen.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.seen.cancelled, "the engine request was not closed"


def test_framing_is_linear_in_the_bytes_of_a_huge_event() -> None:
    # 40 MB of one event in 64 KiB reads: re-joining the pending bytes at every read (the old
    # relay) copies ~13 GB; one pass copies 40 MB.
    framer = Framer(64 * 1024 * 1024)
    piece = b"x" * (64 * 1024)
    began = time.process_time()
    assert framer.feed(b"data: ") == b""
    for _ in range(640):
        assert framer.feed(piece) == b""
    block = framer.feed(b"\n\ndata: next")
    spent = time.process_time() - began
    assert len(block) == 6 + 640 * len(piece) + 2
    assert spent < 1.0, f"{spent:.2f} s of CPU for 40 MB"
    bounded = Framer(1024 * 1024)
    with pytest.raises(EventTooLarge):
        for _ in range(17):
            bounded.feed(piece)


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n", b"\r\r"])
def test_a_boundary_split_across_reads_is_found(sep: bytes) -> None:
    stream = b"data: a" + sep + b"data: b" + sep
    for cut in range(1, len(stream)):
        framer = Framer(1024)
        out = framer.feed(stream[:cut]) + framer.feed(stream[cut:]) + framer.rest()
        assert out == stream
        blocks = [framer.feed(stream[:cut]), framer.feed(stream[cut:])]
        for block in blocks:
            assert not block or block.endswith(sep)
