"""ratelimit: reservations and reconciliation (policy driven directly, on a frozen clock), and the
429s, headers and SDK retries a client sees through the real proxy."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from starlette.datastructures import Headers

from policies import build_policies
from policies.buckets import MemoryStorage
from policies.ratelimit import duration
from policies.services import Services
from proxy.api.chat import ChatCompletions
from proxy.core.api import Usage
from proxy.core.errors import RateLimited, UpstreamServerError
from proxy.core.pipeline import KeyInfo, ProxyRequest, ProxyResponse
from tests.conftest import ProxyFactory
from tests.fakes.vllm import FakeVLLM
from tests.policies.conftest import make_services

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Upstream:
    """The next handler: reports `used` tokens, whole or at the end of a stream."""

    def __init__(self, used: int | None, stream: bool = False, fail_after: int | None = None):
        self.used, self.stream, self.fail_after = used, stream, fail_after
        self.closed = False

    async def _events(self, request: ProxyRequest) -> AsyncIterator[bytes]:
        try:
            for i in range(3):
                if self.fail_after == i:
                    raise UpstreamServerError("reset")
                yield b"data: {}\n\n"
            if self.used is not None:
                request.usage = Usage(prompt_tokens=self.used)
            yield b"data: [DONE]\n\n"
        finally:
            self.closed = True

    async def __call__(self, request: ProxyRequest) -> ProxyResponse:
        if self.stream:
            return ProxyResponse(200, "text/event-stream", stream=self._events(request))
        if self.used is not None:
            request.usage = Usage(prompt_tokens=self.used)
        return ProxyResponse(200, "application/json", b"{}")


@pytest.fixture
async def rig(fake: FakeVLLM) -> AsyncIterator[tuple[Services, Clock]]:
    async with httpx.AsyncClient() as client:
        policies = {
            "order": ["ratelimit"],
            "ratelimit": {"per_key": {"requests_per_minute": 600, "tokens_per_minute": 60_000}},
        }
        services = make_services(client, policies, fake.base_url, 2048)
        clock = Clock()
        services.shared["ratelimit:memory"] = MemoryStorage(clock)
        yield services, clock


def request(max_tokens: int = 100, stream: bool = False) -> ProxyRequest:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": max_tokens}
    r = ProxyRequest(ChatCompletions(), "tiny", body, Headers(headers={}), "rid", stream)
    r.key = KeyInfo("alice")
    return r


async def test_reservation_is_reconciled_with_real_usage(rig: tuple[Services, Clock]) -> None:
    services, _ = rig
    (policy,) = build_policies(services.config, "tiny", services)
    r = request(max_tokens=1000)
    await policy(r, Upstream(used=30))
    reserved = 60_000 - int(r.response_headers["x-ratelimit-remaining-tokens"])
    assert reserved > 1000  # prompt estimate + max_tokens, taken before forwarding
    probe = request(max_tokens=1)
    await policy(probe, Upstream(used=1))
    # After reconciliation only the 30 real tokens (and the probe's reservation) are spent.
    probe_reserved = reserved - 1000 + 1
    assert int(probe.response_headers["x-ratelimit-remaining-tokens"]) == (
        60_000 - 30 - probe_reserved
    )


async def test_streams_reconcile_at_their_end(rig: tuple[Services, Clock]) -> None:
    services, _ = rig
    (policy,) = build_policies(services.config, "tiny", services)
    upstream = Upstream(used=25, stream=True)
    response = await policy(request(max_tokens=500, stream=True), upstream)
    assert response.stream is not None
    assert [c async for c in response.stream][-1] == b"data: [DONE]\n\n"
    assert upstream.closed
    probe = request(max_tokens=1)
    await policy(probe, Upstream(used=1))
    left = int(probe.response_headers["x-ratelimit-remaining-tokens"])
    assert 60_000 - 25 - 20 <= left <= 60_000 - 25  # 25 used + the probe's own reservation


@pytest.mark.parametrize("how", ["abandoned", "broken"])
async def test_a_stream_without_usage_keeps_its_reservation(
    rig: tuple[Services, Clock], how: str
) -> None:
    services, _ = rig
    (policy,) = build_policies(services.config, "tiny", services)
    upstream = Upstream(used=10, stream=True, fail_after=1 if how == "broken" else None)
    r = request(max_tokens=500, stream=True)
    response = await policy(r, upstream)
    reserved_left = int(r.response_headers["x-ratelimit-remaining-tokens"])
    assert response.stream is not None
    stream: Any = response.stream
    if how == "abandoned":
        await anext(stream)
        await stream.aclose()  # the client went away
    else:
        with pytest.raises(UpstreamServerError):
            async for _ in stream:
                pass
    assert upstream.closed
    probe = request(max_tokens=1)
    await policy(probe, Upstream(used=1))
    left = int(probe.response_headers["x-ratelimit-remaining-tokens"])
    assert left < reserved_left  # nothing was given back


async def test_upstream_errors_give_the_tokens_back(rig: tuple[Services, Clock]) -> None:
    services, _ = rig
    (policy,) = build_policies(services.config, "tiny", services)

    async def failing(request: ProxyRequest) -> ProxyResponse:
        raise UpstreamServerError("down")

    with pytest.raises(UpstreamServerError):
        await policy(request(max_tokens=5000), failing)
    probe = request(max_tokens=1)
    await policy(probe, Upstream(used=1))
    assert int(probe.response_headers["x-ratelimit-remaining-tokens"]) > 60_000 - 20


async def test_usage_beyond_the_reservation_never_goes_negative(
    rig: tuple[Services, Clock],
) -> None:
    services, clock = rig
    (policy,) = build_policies(services.config, "tiny", services)
    await policy(request(max_tokens=10), Upstream(used=70_000))  # more than the whole budget
    with pytest.raises(RateLimited) as refused:
        await policy(request(max_tokens=10_000), Upstream(used=1))
    headers = refused.value.headers
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    # 10k tokens (and the prompt estimate) beyond the 10k of debt, at 1000/s.
    assert int(headers["retry-after"]) == 21
    clock.now += 20
    with pytest.raises(RateLimited):
        await policy(request(max_tokens=10_000), Upstream(used=1))
    clock.now += 1
    await policy(request(max_tokens=10_000), Upstream(used=1))


async def test_refusals_carry_openai_headers(rig: tuple[Services, Clock]) -> None:
    services, clock = rig
    (policy,) = build_policies(services.config, "tiny", services)
    for _ in range(600):
        await policy(request(max_tokens=1), Upstream(used=1))
    with pytest.raises(RateLimited) as refused:
        await policy(request(max_tokens=1), Upstream(used=1))
    h = refused.value.headers
    assert refused.value.status == 429
    assert h["x-ratelimit-limit-requests"] == "600"
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-reset-requests"] == "1m0s"
    assert h["retry-after"] == "1" and h["retry-after-ms"] == "100"
    assert "x-should-retry" not in h
    clock.now += 0.1
    await policy(request(max_tokens=1), Upstream(used=1))


async def test_a_request_larger_than_the_budget_must_not_retry(
    rig: tuple[Services, Clock],
) -> None:
    services, _ = rig
    (policy,) = build_policies(services.config, "tiny", services)
    with pytest.raises(RateLimited) as refused:
        await policy(request(max_tokens=100_000), Upstream(used=1))
    assert refused.value.headers["x-should-retry"] == "false"
    assert "can never be served" in refused.value.message


def test_durations_read_like_openais() -> None:
    assert [duration(s) for s in (0.12, 1.0, 1.5, 59.9991, 360.0, 3723.0)] == [
        "120ms",
        "1s",
        "1.5s",
        "1m0s",
        "6m0s",
        "1h2m3s",
    ]


# --- through the real proxy --------------------------------------------------------------------


def test_the_sdk_retry_succeeds_after_the_wait(proxy: ProxyFactory, fake: FakeVLLM) -> None:
    # 60 requests/min spread evenly (window = 1 s): one request, then one per second.
    base = proxy(
        policies={
            "order": ["ratelimit"],
            "ratelimit": {"overall": {"requests_per_minute": 60, "window": 1.0}},
        }
    )
    attempts: list[int] = []
    hooks = {"response": [lambda r: attempts.append(r.status_code)]}
    with (
        httpx.Client(event_hooks=hooks) as http,
        openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=2, http_client=http) as c,
    ):
        raw = c.chat.completions.with_raw_response.create(
            model="tiny", messages=MESSAGES, max_tokens=2
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "1"
        assert raw.headers["x-ratelimit-remaining-requests"] == "0"
        started = time.monotonic()
        reply = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
        waited = time.monotonic() - started
    assert reply.choices[0].message.content
    assert attempts == [200, 429, 200]
    assert 0.5 < waited < 3.0
    assert len(fake.completions) == 2


def test_the_sdk_does_not_retry_what_can_never_fit(proxy: ProxyFactory, fake: FakeVLLM) -> None:
    base = proxy(
        policies={"order": ["ratelimit"], "ratelimit": {"overall": {"tokens_per_minute": 1000}}}
    )
    attempts: list[int] = []
    hooks = {"response": [lambda r: attempts.append(r.status_code)]}
    with (
        httpx.Client(event_hooks=hooks) as http,
        openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=2, http_client=http) as c,
        pytest.raises(openai.RateLimitError) as raised,
    ):
        c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5000)
    assert attempts == [429]
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert fake.completions == []


def test_per_model_and_overall_budgets(proxy: ProxyFactory, fake: FakeVLLM) -> None:
    config = {
        "server": {"drain_timeout": 1.0},
        "upstream": {"health_interval": 30.0, "metrics_interval": 30.0},
        "models": {
            "tiny": {"upstreams": [fake.base_url]},
            "other": {"upstreams": [fake.base_url], "served_name": "tiny"},
        },
        "policies": {
            "order": ["ratelimit"],
            "ratelimit": {
                "overall": {"requests_per_minute": 3},
                "per_model": {"requests_per_minute": 2},
                "models": {"other": {"per_model": {"requests_per_minute": 1}}},
            },
        },
    }
    base = proxy(config=config)

    def status(model: str) -> int:
        body = {"model": model, "messages": MESSAGES, "max_tokens": 1}
        return httpx.post(f"{base}/v1/chat/completions", json=body).status_code

    assert [status("tiny"), status("tiny"), status("tiny")] == [200, 200, 429]
    assert [status("other"), status("other")] == [200, 429]  # its own, smaller budget
    # Overall budget (3) now spent: the refused requests above consumed nothing.
    assert status("tiny") == 429


def test_streams_through_the_proxy_reconcile_without_showing_usage(
    proxy: ProxyFactory, fake: FakeVLLM
) -> None:
    base = proxy(
        policies={"order": ["ratelimit"], "ratelimit": {"overall": {"tokens_per_minute": 60_000}}}
    )
    # 50k tokens reserved; the fake generates 3 and reports usage only because the proxy asks.
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 50_000,
        "stream": True,
        "fake": {"tokens": 3},
    }
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        assert int(r.headers["x-ratelimit-remaining-tokens"]) < 10_000
        text = r.read()
    assert b'"usage"' not in text  # the client did not ask for it
    assert fake.completions[0].body["stream_options"] == {"include_usage": True}
    probe = {"model": "tiny", "messages": MESSAGES, "max_tokens": 1}
    r2 = httpx.post(f"{base}/v1/chat/completions", json=probe)
    # Settled to the 11 real tokens: nearly the whole budget is back (refill alone is 1000/s).
    assert int(r2.headers["x-ratelimit-remaining-tokens"]) > 59_900


def test_unreachable_redis_fails_open_or_closed(proxy: ProxyFactory, fake: FakeVLLM) -> None:
    dead = "redis://127.0.0.1:9/0"
    limits = {"requests_per_minute": 1}
    open_ = proxy(
        policies={"order": ["ratelimit"], "ratelimit": {"storage": dead, "overall": limits}}
    )
    closed = proxy(
        policies={
            "order": ["ratelimit"],
            "ratelimit": {"storage": dead, "overall": limits, "fail_open": False},
        }
    )
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 1}
    assert [
        httpx.post(f"{open_}/v1/chat/completions", json=body).status_code for _ in range(2)
    ] == [
        200,
        200,
    ]
    refused = httpx.post(f"{closed}/v1/chat/completions", json=body)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
