"""Every route family gets chat's reliability: the same faults, each answered in the route's own
shape, over real sockets through the real proxy to fake engines.

The routes are the API-surface issue's: Responses, Anthropic Messages and count_tokens,
embeddings, rerank and score. For each: a 5xx is redacted and counted by the breaker, a 4xx
passes through untouched and uncounted, a failure before the first byte is retried, an open
breaker fails fast, a client leaving cancels the engine's request (before the first byte and
mid-stream), a stream broken after its first byte ends with the route's error event (the
OpenAI and Anthropic SDKs raise on it), and token budgets are charged from the route's own
usage object.
"""

from __future__ import annotations

import time
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from tests.fakes.sse_read import typed_events
from tests.fakes.vllm import FakeVLLM
from tests.observability.helpers import family, scrape
from tests.proxy.helpers import RawClient
from tests.resilience.conftest import FakeFactory, Gateway, GatewayFactory, config

HELLO = [{"role": "user", "content": "Hello"}]
SERVER_ERROR = {"status": 500, "body": "Traceback (most recent call last): /srv/secret/path.py"}

# name: (path, a small request, whether it streams, its error shape)
ROUTES: dict[str, tuple[str, dict[str, Any], bool, str]] = {
    "responses": (
        "/v1/responses",
        {"model": "tiny", "input": "Hi", "max_output_tokens": 4},
        True,
        "openai",
    ),
    "messages": (
        "/v1/messages",
        {"model": "tiny", "max_tokens": 4, "messages": HELLO},
        True,
        "anthropic",
    ),
    "count_tokens": (
        "/v1/messages/count_tokens",
        {"model": "tiny", "messages": HELLO},
        False,
        "anthropic",
    ),
    "embeddings": ("/v1/embeddings", {"model": "tiny", "input": ["a", "b"]}, False, "openai"),
    "rerank": (
        "/v1/rerank",
        {"model": "tiny", "query": "q", "documents": ["a", "b"]},
        False,
        "openai",
    ),
    "score": (
        "/v1/score",
        {"model": "tiny", "text_1": "q", "text_2": ["a", "b"]},
        False,
        "openai",
    ),
}
STREAMING = [name for name, (_, _, streams, _) in ROUTES.items() if streams]
# Each route streaming where it can, and not.
CASES = [(name, False) for name in ROUTES] + [(name, True) for name in STREAMING]
CASE_IDS = [f"{name}-{'stream' if stream else 'whole'}" for name, stream in CASES]


def body_of(name: str, stream: bool = False, **extra: Any) -> dict[str, Any]:
    _, body, _, _ = ROUTES[name]
    return {**body, **({"stream": True} if stream else {}), **extra}


def post(gw: Gateway, name: str, stream: bool = False, **extra: Any) -> httpx.Response:
    return httpx.post(
        gw.base_url + ROUTES[name][0], json=body_of(name, stream, **extra), timeout=10
    )


def seen(fake: FakeVLLM, name: str) -> int:
    return len(fake.requests_to(ROUTES[name][0]))


def start(gateway: GatewayFactory, *urls: str, **resilience: Any) -> Gateway:
    return gateway(config({"tiny": {"upstreams": list(urls)}}, resilience))


def assert_error_shape(name: str, response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()
    if ROUTES[name][3] == "anthropic":
        assert error["type"] == "error"
        assert set(error["error"]) == {"type", "message"}
        return error["error"]
    assert set(error["error"]) == {"message", "type", "param", "code"}
    return error["error"]


@pytest.mark.parametrize(("name", "stream"), CASES, ids=CASE_IDS)
def test_a_5xx_is_redacted_in_the_route_s_shape_and_counted(
    fakes: FakeFactory, gateway: GatewayFactory, name: str, stream: bool
) -> None:
    fake = fakes()
    gw = start(gateway, fake.base_url, retry={"attempts": 1}, breaker={"fail_max": 5})
    fake.defaults = SERVER_ERROR
    r = post(gw, name, stream)
    error = assert_error_shape(name, r, 502)
    assert "Traceback" not in r.text and "secret" not in r.text
    assert "upstream" in error["message"].lower()
    assert gw.upstream().breaker.fail_counter == 1


@pytest.mark.parametrize(("name", "stream"), CASES, ids=CASE_IDS)
def test_a_4xx_passes_through_unchanged_not_retried_not_counted(
    fakes: FakeFactory, gateway: GatewayFactory, name: str, stream: bool
) -> None:
    fake = fakes()
    gw = start(gateway, fake.base_url, retry={"attempts": 3})
    canned = {"error": {"message": "nope", "type": "BadRequestError", "param": "x", "code": 400}}
    r = post(gw, name, stream, fake={"status": 400, "body": canned})
    assert (r.status_code, r.json()) == (400, canned)
    assert seen(fake, name) == 1
    assert gw.upstream().breaker.fail_counter == 0


@pytest.mark.parametrize(("name", "stream"), CASES, ids=CASE_IDS)
def test_a_failure_before_the_first_byte_is_retried(
    fakes: FakeFactory, gateway: GatewayFactory, name: str, stream: bool
) -> None:
    fake = fakes()
    gw = start(gateway, fake.base_url, retry={"attempts": 2})
    flaky = {"fail_first": 1, "fail_with": {"status": 502, "body": "down"}}
    r = post(gw, name, stream, fake=flaky)
    assert r.status_code == 200, r.text
    assert seen(fake, name) == 2
    if stream:
        names = [event for event, _ in typed_events(r.content)]
        # One coherent stream: one start, one end, nothing of the failed attempt.
        start_event = "response.created" if name == "responses" else "message_start"
        end_event = "response.completed" if name == "responses" else "message_stop"
        assert names.count(start_event) == 1 and names[-1] == end_event
    else:
        assert r.json()  # a whole JSON answer


@pytest.mark.parametrize("name", list(ROUTES))
def test_an_open_breaker_fails_fast_without_touching_the_engine(
    fakes: FakeFactory, gateway: GatewayFactory, name: str
) -> None:
    fake = fakes()
    gw = start(gateway, fake.base_url, retry={"attempts": 1}, breaker={"fail_max": 2})
    fake.defaults = SERVER_ERROR
    for _ in range(2):
        assert post(gw, name).status_code == 502
    assert gw.upstream().breaker.current_state == "open"
    before = seen(fake, name)
    started = time.monotonic()
    r = post(gw, name)
    assert time.monotonic() - started < 0.5
    assert_error_shape(name, r, 503)
    assert "retry-after" in r.headers
    assert seen(fake, name) == before


@pytest.mark.parametrize(("name", "stream"), CASES, ids=CASE_IDS)
def test_a_client_leaving_before_the_first_byte_cancels_the_engine_s_request(
    fakes: FakeFactory, gateway: GatewayFactory, name: str, stream: bool
) -> None:
    fake = fakes()
    gw = start(gateway, fake.base_url, breaker={"fail_max": 2})
    with RawClient(gw.base_url) as client:
        client.post_json(ROUTES[name][0], body_of(name, stream, fake={"never_answer": True}))
        assert fake.wait(lambda r: seen(fake, name) == 1, 5.0)
        closed_at = client.close()
    assert fake.wait(lambda r: len(r.cancelled) == 1, 2.0)
    assert fake.seen.cancelled[0].at - closed_at < 1.0
    assert gw.upstream().breaker.fail_counter == 0


@pytest.mark.parametrize("name", STREAMING)
def test_a_client_leaving_mid_stream_stops_the_engine_within_1s(
    fakes: FakeFactory, gateway: GatewayFactory, name: str
) -> None:
    fake = fakes()
    gw = start(gateway, fake.base_url)
    budget = "max_output_tokens" if name == "responses" else "max_tokens"
    with RawClient(gw.base_url) as client:
        client.post_json(
            ROUTES[name][0], body_of(name, True, fake={"token_delay": 0.02}, **{budget: 1500})
        )
        client.read_until(b"event: ", count=4)
        closed_at = client.close()
    assert fake.wait(lambda r: len(r.cancelled) == 1, 2.0)
    (gone,) = fake.seen.cancelled
    assert gone.at - closed_at < 1.0
    assert gone.events_sent < 200  # the engine stopped generating
    assert gw.upstream().breaker.fail_counter == 0


@pytest.mark.parametrize("name", STREAMING)
def test_a_stream_broken_after_its_first_byte_ends_with_the_route_s_error_event(
    fakes: FakeFactory, gateway: GatewayFactory, name: str
) -> None:
    fake = fakes()
    gw = start(gateway, fake.base_url, retry={"attempts": 3})
    r = post(gw, name, True, fake={"reset_after_events": 3})
    assert r.status_code == 200  # the head was out before the engine failed
    got = typed_events(r.content)
    last_event, last = got[-1]
    assert last_event == "error"
    if name == "responses":
        assert last["type"] == "error" and last["message"]
        assert "response.completed" not in [e for e, _ in got]
    else:
        assert last["type"] == "error" and last["error"]["type"] == "api_error"
        assert "message_stop" not in [e for e, _ in got]
    assert seen(fake, name) == 1  # never retried once bytes reached the client
    assert gw.upstream().breaker.fail_counter == 1


def test_the_openai_sdk_raises_on_a_broken_responses_stream(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = start(gateway, fake.base_url)
    client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0)
    with (
        client.responses.stream(
            model="tiny",
            input="Hi",
            max_output_tokens=50,
            extra_body={"fake": {"reset_after_events": 4}},
        ) as stream,
        pytest.raises(RuntimeError, match=r"response\.completed"),
    ):
        stream.get_final_response()


def test_the_anthropic_sdk_raises_on_a_broken_messages_stream(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = start(gateway, fake.base_url)
    client = anthropic.Anthropic(base_url=gw.base_url, api_key="x", max_retries=0)
    with (
        client.messages.stream(
            model="tiny",
            max_tokens=50,
            messages=[{"role": "user", "content": "Hi"}],
            extra_body={"fake": {"reset_after_events": 4}},
        ) as stream,
        pytest.raises(anthropic.APIStatusError),
    ):
        for _ in stream.text_stream:
            pass


def used_tokens(name: str, response: httpx.Response) -> int:
    """What the engine reported using, read from the answer the client got."""
    if response.headers["content-type"].startswith("text/event-stream"):
        got = typed_events(response.content)
        if name == "responses":
            usage = got[-1][1]["response"]["usage"]
            return int(usage["input_tokens"] + usage["output_tokens"])
        start_usage = got[0][1]["message"]["usage"]
        delta = [data for event, data in got if event == "message_delta"][-1]["usage"]
        return int(delta.get("input_tokens", start_usage["input_tokens"]) + delta["output_tokens"])
    if name == "count_tokens":
        return 0  # counting costs the engine no generation: no token budget is charged
    usage = orjson.loads(response.content)
    usage = usage.get("usage", usage)
    if "input_tokens" in usage:  # Responses, Messages
        return int(usage["input_tokens"] + usage.get("output_tokens", 0))
    return int(usage["prompt_tokens"] + usage.get("completion_tokens", 0))


@pytest.mark.parametrize(("name", "stream"), CASES, ids=CASE_IDS)
def test_token_budgets_are_charged_from_the_route_s_own_usage(
    fakes: FakeFactory, gateway: GatewayFactory, name: str, stream: bool
) -> None:
    fake = fakes()
    # 3,600 tokens that refill at one a second: a test's runtime hardly moves the figures.
    limits = {"tokens_per_minute": 60, "window": 3600}
    gw = gateway(
        config(
            {"tiny": {"upstreams": [fake.base_url]}},
            policies={"order": ["ratelimit"], "ratelimit": {"overall": limits}},
        )
    )
    first, second = post(gw, name, stream), post(gw, name, stream)
    assert first.status_code == second.status_code == 200, first.text
    before = int(first.headers["x-ratelimit-remaining-tokens"])
    after = int(second.headers["x-ratelimit-remaining-tokens"])
    # The second reserved what the first did; between them only the first's real use stays.
    assert before - after == pytest.approx(used_tokens(name, first), abs=2)
    generates = name in STREAMING
    if name == "count_tokens":
        assert before == 3600
    elif not generates:
        # Nothing is generated: the reservation is the prompt estimate, no output budget.
        assert 3600 - before < 16


def test_every_route_is_counted_in_the_metrics_under_its_own_label(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = gateway(
        config({"tiny": {"upstreams": [fake.base_url]}}, admin={"enabled": True, "port": 0})
    )
    for name, stream in CASES:
        assert post(gw, name, stream).status_code == 200
    samples = family(scrape(gw.server), "vgate_requests_total")
    routes = {dict(labels)["route"] for labels in samples}
    assert {
        "responses",
        "messages",
        "messages/count_tokens",
        "embeddings",
        "rerank",
        "score",
    } <= routes


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages"])
def test_a_prompt_too_long_for_its_model_falls_back_to_a_longer_one(
    fakes: FakeFactory, gateway: GatewayFactory, path: str
) -> None:
    short, long = fakes(max_model_len=32), fakes(max_model_len=4096)
    data = config(
        {
            "tiny": {"upstreams": [short.base_url], "fallbacks": ["backup"]},
            "backup": {"upstreams": [long.base_url], "served_name": "tiny"},
        },
        policies={"order": ["truncate"], "truncate": {"strategy": "reject"}},
    )
    gw = gateway(data)
    words = " ".join(["word"] * 60)
    if path == "/v1/responses":
        body: dict[str, Any] = {"input": words, "max_output_tokens": 4}
    else:
        body = {"messages": [{"role": "user", "content": words}], "max_tokens": 4}
    r = httpx.post(gw.base_url + path, json={"model": "tiny", **body}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["x-vgate-upstream"] == f"{long.base_url} backup"
    assert short.requests_to(path) == []  # nothing sent just to earn its 400
    assert len(long.requests_to(path)) == 1
