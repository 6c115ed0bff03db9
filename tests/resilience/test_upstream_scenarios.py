"""Reliability contract, "Upstream and breaker" (scenarios 1-15), over real sockets.

Each test runs the real proxy in front of fake engines (tests.fakes.vllm) and asserts on the
client's answer, on what the fakes saw (requests, connections, cancellations) and on the
proxy's own state (breaker, slots) through its live Runtime.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import httpx
import orjson
import pytest

from proxy.upstream.retry import BudgetedRetry
from tests.fakes.vllm import FakeVLLM
from tests.observability.helpers import family, scrape, wait_for
from tests.proxy.helpers import CHAT_PATH, RawClient, chat, events
from tests.resilience.conftest import FakeFactory, GatewayFactory, closed_port_url, config

SERVER_ERROR = {"status": 500, "body": "Traceback (most recent call last): secret/path.py"}


def post(base: str, body: dict[str, Any], timeout: float = 10.0, **kw: Any) -> httpx.Response:
    return httpx.post(base + CHAT_PATH, json=body, timeout=timeout, **kw)


def one_model(url: str, **resilience: Any) -> dict[str, Any]:
    return config({"tiny": {"upstreams": [url]}}, resilience)


def completions(fake: FakeVLLM) -> int:
    return len(fake.completions)


# 1 -------------------------------------------------------------------------------------------


def test_closed_port_is_a_quick_openai_error_and_one_breaker_failure(
    gateway: GatewayFactory,
) -> None:
    gw = gateway(one_model(closed_port_url(), retry={"attempts": 1}))
    start = time.monotonic()
    r = post(gw.base_url, chat())
    assert time.monotonic() - start < 2.0
    assert r.status_code in (502, 503)
    assert r.json()["error"]["code"] == "upstream_unreachable"
    breaker = gw.upstream().breaker
    assert breaker.fail_counter == 1
    assert breaker.current_state == "closed"


def test_each_attempt_at_a_closed_port_counts(gateway: GatewayFactory) -> None:
    gw = gateway(one_model(closed_port_url(), retry={"attempts": 3}, breaker={"fail_max": 10}))
    r = post(gw.base_url, chat())
    assert r.status_code == 502
    assert gw.upstream().breaker.fail_counter == 3
    assert gw.upstream().attempts == 3
    assert gw.upstream().inflight == 0


# 2 -------------------------------------------------------------------------------------------


def test_5xx_fail_max_times_opens_then_fails_fast_without_touching_upstream(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes(defaults=SERVER_ERROR)
    gw = gateway(one_model(fake.base_url, retry={"attempts": 1}, breaker={"fail_max": 3}))
    with httpx.Client(base_url=gw.base_url, timeout=10) as client:
        for _ in range(3):
            r = client.post(CHAT_PATH, json=chat())
            assert r.status_code == 502
            assert b"Traceback" not in r.content
        assert gw.upstream().breaker.current_state == "open"
        seen_requests, seen_connections = completions(fake), fake.seen.connections
        took = []
        for _ in range(20):
            start = time.perf_counter()
            r = client.post(CHAT_PATH, json=chat())
            took.append(time.perf_counter() - start)
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "upstream_circuit_open"
            assert int(r.headers["retry-after"]) >= 1
    took.sort()
    assert took[len(took) // 2] < 0.010, took  # round trip through the proxy, median
    assert completions(fake) == seen_requests == 3
    assert fake.seen.connections == seen_connections
    assert gw.upstream().breaker.rejected == 20


# 3 and 4 -------------------------------------------------------------------------------------


def trip(gw_base: str, times: int) -> None:
    for _ in range(times):
        assert post(gw_base, chat(fake=SERVER_ERROR)).status_code == 502


async def test_after_the_reset_timeout_concurrent_requests_send_bounded_probes(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = gateway(
        one_model(
            fake.base_url,
            retry={"attempts": 1},
            breaker={"fail_max": 2, "reset_timeout": 0.5, "half_open_max": 1},
        )
    )
    trip(gw.base_url, 2)
    assert gw.upstream().breaker.current_state == "open"
    await asyncio.sleep(0.6)
    before = completions(fake)
    slow = chat(fake={"first_byte_delay": 0.3})
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=10) as client:
        answers = await asyncio.gather(*(client.post(CHAT_PATH, json=slow) for _ in range(20)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses.count(200) == 1
    assert statuses.count(503) == 19
    assert completions(fake) - before == 1  # exactly one probe reached the engine
    assert gw.upstream().breaker.current_state == "closed"
    assert post(gw.base_url, chat()).status_code == 200


def test_failed_probe_reopens_and_restarts_the_timer(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = gateway(
        one_model(
            fake.base_url, retry={"attempts": 1}, breaker={"fail_max": 1, "reset_timeout": 0.4}
        )
    )
    trip(gw.base_url, 1)
    time.sleep(0.45)
    assert post(gw.base_url, chat(fake=SERVER_ERROR)).status_code == 502  # the probe fails
    breaker = gw.upstream().breaker
    assert breaker.current_state == "open"
    assert breaker.trips == 2
    assert breaker.retry_in() > 0.3  # the timer started again
    before = completions(fake)
    assert post(gw.base_url, chat()).status_code == 503
    assert completions(fake) == before
    time.sleep(0.45)
    assert post(gw.base_url, chat()).status_code == 200
    assert breaker.current_state == "closed"


# 5 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_4xx_passed_through_unchanged_not_retried_not_counted(
    fakes: FakeFactory, gateway: GatewayFactory, status: int
) -> None:
    fake = fakes()
    backup = fakes()
    gw = gateway(
        config(
            {
                "tiny": {"upstreams": [fake.base_url], "fallbacks": ["backup"]},
                "backup": {"upstreams": [backup.base_url], "served_name": "tiny"},
            },
            {"breaker": {"fail_max": 2}},
        )
    )
    fake.defaults = SERVER_ERROR
    trip_once = post(gw.base_url, chat())  # one failure on record ...
    assert trip_once.status_code == 200  # ... and served by the fallback
    fake.defaults = {}
    backup_before = completions(backup)
    assert gw.upstream().breaker.fail_counter == 1
    body = {"error": {"message": "nope", "type": "BadRequestError", "param": "x", "code": status}}
    r = post(gw.base_url, chat(fake={"status": status, "body": body}))
    assert r.status_code == status
    assert r.json() == body
    assert completions(fake) == 2
    assert completions(backup) == backup_before  # a 4xx never falls back
    assert gw.upstream().breaker.fail_counter == 0  # the engine answered: not a failure
    assert gw.upstream().breaker.current_state == "closed"


# 6 -------------------------------------------------------------------------------------------


def test_clients_disconnecting_leave_the_breaker_unchanged(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = gateway(one_model(fake.base_url, breaker={"fail_max": 2}))
    cases = [
        (True, {"token_delay": 0.02}),  # mid-stream
        (False, {"never_answer": True}),  # before any byte
        (True, {"first_event_delay": 30}),  # upstream headers sent, prefill running
        (False, {"first_byte_delay": 30}),
        (True, {"never_answer": True}),
        (True, {"token_delay": 0.02}),
    ]
    for i, (stream, fault) in enumerate(cases):
        with RawClient(gw.base_url) as client:
            client.post_json(CHAT_PATH, chat(tokens=500, stream=stream, fake=fault))
            if "token_delay" in fault:
                client.read_until(b"data: ", count=2)
            else:
                assert fake.wait(lambda r: r.inflight == 1, 5.0)
        assert fake.wait(lambda r, n=i + 1: len(r.cancelled) == n, 3.0)
    upstream = gw.upstream()
    assert upstream.breaker.current_state == "closed"
    assert upstream.breaker.fail_counter == 0
    assert upstream.failures == 0
    deadline = time.monotonic() + 2
    while upstream.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert upstream.inflight == 0


# 7 and 8 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [{"status": 502}, {"reset_after_events": 0}, {"status": 503, "first_byte_delay": 0.05}],
    ids=["502", "reset-before-first-event", "slow-503"],
)
def test_failure_before_the_first_byte_of_a_stream_is_retried_into_one_coherent_stream(
    fakes: FakeFactory, gateway: GatewayFactory, failure: dict[str, Any]
) -> None:
    fake = fakes()
    gw = gateway(one_model(fake.base_url))
    clean = post(fake.base_url, chat(tokens=6, stream=True))
    r = post(
        gw.base_url,
        chat(tokens=6, stream=True, fake={"fail_first": 1, "fail_with": failure}),
        headers={"x-request-id": f"retry-{id(failure)}"},
    )
    assert r.status_code == 200
    got = events(r.content)
    want = events(clean.content)
    assert len(got) == len(want)  # the usage event the proxy asked for is stripped again
    assert got[-1] == b"[DONE]"
    assert b"error" not in r.content
    text = "".join(orjson.loads(e)["choices"][0]["delta"].get("content", "") for e in got[:-1])
    assert text == "Hello wörld, 日本語 🙂 the"
    assert completions(fake) == 3  # the direct one, the failed attempt, the retry
    assert gw.upstream().breaker.fail_counter == 0  # the success after it reset the count
    assert gw.upstream().failures == 1


def test_reset_after_events_is_not_retried_and_never_ends_cleanly(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = gateway(one_model(fake.base_url))
    r = post(gw.base_url, chat(tokens=10, stream=True, fake={"reset_after_events": 3}))
    assert r.status_code == 200
    got = events(r.content)
    assert len(got) == 4
    assert orjson.loads(got[-1])["error"]["code"] == "upstream_stream_broken"
    assert b"[DONE]" not in r.content
    assert completions(fake) == 1
    assert gw.upstream().failures == 1
    assert gw.upstream().inflight == 0


# 9 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("breaker", [False, True], ids=["budget-only", "with-breaker"])
async def test_total_failure_at_concurrency_50_bounds_upstream_attempts(
    fakes: FakeFactory, gateway: GatewayFactory, breaker: bool
) -> None:
    fake = fakes(defaults={"status": 503})
    gw = gateway(
        one_model(
            fake.base_url,
            retry={"attempts": 5, "backoff_base": 0.001, "backoff_max": 0.002},
            breaker={"enabled": breaker, "fail_max": 5, "reset_timeout": 60},
        )
    )
    requests = 200
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    statuses: list[int] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            queue.get_nowait()
            statuses.append((await client.post(CHAT_PATH, json=chat())).status_code)

    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=30, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(50)))
    assert len(statuses) == requests
    assert set(statuses) <= {502, 503}
    attempts = completions(fake)
    assert attempts <= 1.2 * requests + 3, attempts
    if breaker:
        # The first wave (50 in flight) reaches the engine; after that the breaker is open.
        assert attempts <= 50 + 0.2 * 50 + 3, attempts
    retry = gw.runtime.forwarder.retry
    assert isinstance(retry, BudgetedRetry)
    assert retry.budget.spent <= 0.2 * requests + 3


# 10 ------------------------------------------------------------------------------------------


def test_silent_upstream_times_out_per_attempt_and_the_other_serves(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    silent = fakes(defaults={"never_answer": True})
    good = fakes()
    gw = gateway(
        config(
            {"tiny": {"upstreams": [silent.base_url, good.base_url]}},
            {"retry": {"attempt_timeout": 0.3}},
        )
    )
    start = time.monotonic()
    for _ in range(2):  # least outstanding: one of the two goes to the silent one first
        r = post(gw.base_url, chat())
        assert r.status_code == 200
        assert r.headers["x-vgate-upstream"] == f"{good.base_url} tiny"
    assert time.monotonic() - start < 2.0
    assert silent.wait(lambda rec: len(rec.cancelled) >= 1, 2.0)
    assert gw.upstream("tiny", 0).failures >= 1
    assert gw.upstream("tiny", 0).breaker.fail_counter >= 1


def test_silent_upstream_fails_within_the_deadline(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    silent = fakes(defaults={"never_answer": True})
    gw = gateway(
        one_model(
            silent.base_url,
            retry={"attempt_timeout": 0.2, "attempts": 10, "deadline": 0.7},
            breaker={"fail_max": 100},
        )
    )
    start = time.monotonic()
    r = post(gw.base_url, chat(stream=True))
    took = time.monotonic() - start
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert took < 0.7 + 0.2 + 0.5
    tried = completions(silent)
    assert 2 <= tried <= 4
    assert silent.wait(lambda rec: len(rec.cancelled) == tried, 2.0)
    assert gw.upstream().inflight == 0


def test_first_byte_timeout_of_the_request_counts_against_the_breaker(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    silent = fakes(defaults={"never_answer": True})
    data = one_model(silent.base_url)
    data["upstream"]["first_byte_timeout"] = 0.3
    gw = gateway(data)
    r = post(gw.base_url, chat())
    assert r.status_code == 504
    assert gw.upstream().breaker.fail_counter == 1
    assert silent.wait(lambda rec: len(rec.cancelled) == 1, 2.0)


# 11 ------------------------------------------------------------------------------------------


async def test_over_capacity_requests_wait_bounded_or_are_shed_at_once(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes(defaults={"first_byte_delay": 0.5})
    gw = gateway(
        one_model(
            fake.base_url,
            backpressure={
                "max_inflight": 2,
                "queue_size": 2,
                "max_queue_wait": 5,
                "retry_after": 2,
            },
        )
    )
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=10) as client:

        async def timed() -> tuple[httpx.Response, float]:
            start = time.monotonic()
            r = await client.post(CHAT_PATH, json=chat())
            return r, time.monotonic() - start

        answers = await asyncio.gather(*(timed() for _ in range(10)))
    ok = [t for r, t in answers if r.status_code == 200]
    shed = [(r, t) for r, t in answers if r.status_code != 200]
    assert len(ok) == 4  # two at once, then the two that waited
    assert len(shed) == 6
    for r, took in shed:
        assert r.status_code == 503
        assert r.headers["retry-after"] == "2"
        assert r.json()["error"]["code"] == "overloaded"
        assert took < 0.4  # immediate, not after a wait
    assert fake.seen.max_inflight == 2
    assert gw.runtime.routes["tiny"].admission.shed == {"queue_full": 6}


async def test_queue_wait_is_bounded(fakes: FakeFactory, gateway: GatewayFactory) -> None:
    fake = fakes(defaults={"first_byte_delay": 1.0})
    gw = gateway(
        one_model(
            fake.base_url, backpressure={"max_inflight": 1, "queue_size": 8, "max_queue_wait": 0.2}
        )
    )
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=10) as client:
        answers = await asyncio.gather(*(client.post(CHAT_PATH, json=chat()) for _ in range(4)))
    assert sorted(r.status_code for r in answers) == [200, 503, 503, 503]
    assert gw.runtime.routes["tiny"].admission.shed == {"queue_timeout": 3}
    assert gw.runtime.routes["tiny"].admission.waiting == 0


async def test_a_flood_of_shed_requests_keeps_state_bounded(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes(defaults={"first_byte_delay": 3.0})
    gw = gateway(
        one_model(
            fake.base_url,
            backpressure={"max_inflight": 1, "queue_size": 4, "max_queue_wait": 0.1},
        )
    )
    admission = gw.runtime.routes["tiny"].admission
    async with httpx.AsyncClient(
        base_url=gw.base_url, timeout=10, limits=httpx.Limits(max_connections=64)
    ) as client:
        first = asyncio.create_task(client.post(CHAT_PATH, json=chat()))
        await asyncio.sleep(0.1)
        gc.collect()
        for _ in range(3):
            answers = await asyncio.gather(
                *(client.post(CHAT_PATH, json=chat()) for _ in range(100)),
                return_exceptions=True,
            )
            assert all(isinstance(a, httpx.Response) for a in answers)
            assert admission.waiting <= 4
            assert len(admission._heap) <= 2 * 4 + 16
        first.cancel()
    assert sum(admission.shed.values()) >= 295


async def test_low_priority_keys_are_shed_first(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    from policies.auth import digest_hex

    fake = fakes(defaults={"first_byte_delay": 0.6})
    keys = [
        {"name": "batch", "sha256": digest_hex("vg-batch"), "priority": 0},
        {"name": "live", "sha256": digest_hex("vg-live"), "priority": 5},
    ]
    gw = gateway(
        config(
            {"tiny": {"upstreams": [fake.base_url]}},
            {"backpressure": {"max_inflight": 1, "queue_size": 2, "kv_cache_threshold": 0.5}},
            policies={"order": ["auth"], "auth": {"keys": keys}},
        )
    )

    def as_key(key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}

    async with httpx.AsyncClient(base_url=gw.base_url, timeout=10) as client:
        busy = asyncio.create_task(client.post(CHAT_PATH, json=chat(), headers=as_key("vg-live")))
        await asyncio.sleep(0.2)
        low = [
            asyncio.create_task(client.post(CHAT_PATH, json=chat(), headers=as_key("vg-batch")))
            for _ in range(2)
        ]
        await asyncio.sleep(0.2)  # the queue is full of low-priority waiters
        high = await client.post(CHAT_PATH, json=chat(), headers=as_key("vg-live"))
        lows = await asyncio.gather(*low)
        assert (await busy).status_code == 200
    assert high.status_code == 200
    assert sorted(r.status_code for r in lows) == [200, 503]
    assert gw.runtime.routes["tiny"].admission.shed == {"preempted": 1}
    # A hot KV cache sheds the low priority key and still serves the high one.
    gw.upstream().monitor.kv_cache_usage = 0.9
    r = post(gw.base_url, chat(), headers=as_key("vg-batch"))
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert post(gw.base_url, chat(), headers=as_key("vg-live")).status_code == 200
    assert gw.runtime.routes["tiny"].admission.shed["kv_cache"] == 1


# 13 ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_31s_to_first_token_is_not_a_timeout(fakes: FakeFactory, gateway: GatewayFactory) -> None:
    # Longer than the default retry deadline (30 s): the deadline bounds retries, not attempts.
    fake = fakes()
    gw = gateway(one_model(fake.base_url))
    r = post(gw.base_url, chat(stream=True, fake={"first_event_delay": 31}), timeout=60)
    assert r.status_code == 200
    assert events(r.content)[-1] == b"[DONE]"
    assert gw.upstream().breaker.fail_counter == 0


# 14 ------------------------------------------------------------------------------------------


def test_silent_mid_stream_is_an_error_event_and_frees_the_slot(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    data = one_model(fake.base_url)
    data["upstream"]["stream_idle_timeout"] = 0.4
    gw = gateway(data)
    r = post(gw.base_url, chat(tokens=10, stream=True, fake={"hang_after_events": 3}))
    got = events(r.content)
    assert orjson.loads(got[-1])["error"]["code"] == "upstream_timeout"
    assert b"[DONE]" not in r.content
    assert fake.wait(lambda rec: len(rec.cancelled) == 1, 2.0)
    assert gw.upstream().inflight == 0
    assert gw.upstream().breaker.fail_counter == 1  # an idle upstream is the upstream's fault


# 15 ------------------------------------------------------------------------------------------


def fallback_config(primary: str, backup: str, **resilience: Any) -> dict[str, Any]:
    return config(
        {
            "tiny": {"upstreams": [primary], "fallbacks": ["backup"]},
            "backup": {"upstreams": [backup], "served_name": "tiny"},
        },
        resilience,
    )


def test_open_breaker_falls_back_marked_in_a_header(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    primary = fakes(defaults=SERVER_ERROR)
    backup = fakes()
    gw = gateway(fallback_config(primary.base_url, backup.base_url, breaker={"fail_max": 2}))
    for _ in range(2):  # each failure fails over at once
        r = post(gw.base_url, chat())
        assert r.status_code == 200
        assert r.headers["x-vgate-upstream"] == f"{backup.base_url} backup"
    assert gw.upstream().breaker.current_state == "open"
    seen = completions(primary)
    for stream in (False, True):
        r = post(gw.base_url, chat(stream=stream))
        assert r.status_code == 200
        assert r.headers["x-vgate-upstream"] == f"{backup.base_url} backup"
    assert completions(primary) == seen  # open: not even tried
    ready = httpx.get(gw.base_url + "/ready").json()
    assert ready["upstreams"]["tiny"][primary.base_url]["breaker"] == "open"


def test_connect_error_falls_back(fakes: FakeFactory, gateway: GatewayFactory) -> None:
    backup = fakes()
    gw = gateway(fallback_config(closed_port_url(), backup.base_url))
    r = post(gw.base_url, chat(stream=True))
    assert r.status_code == 200
    assert r.headers["x-vgate-upstream"] == f"{backup.base_url} backup"
    assert events(r.content)[-1] == b"[DONE]"


def test_vllm_prompt_too_long_falls_back_to_the_longer_model(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    too_long = {
        "error": {
            "message": "This model's maximum context length is 64 tokens. However, your prompt "
            "contains 90 input tokens, which exceeds this limit even without any output tokens.",
            "type": "BadRequestError",
            "param": "input_tokens",
            "code": 400,
        }
    }
    short = fakes(max_model_len=64, defaults={"status": 400, "body": too_long})
    long = fakes(max_model_len=4096)
    gw = gateway(fallback_config(short.base_url, long.base_url))
    r = post(gw.base_url, chat())
    assert r.status_code == 200
    assert r.headers["x-vgate-upstream"] == f"{long.base_url} backup"
    assert gw.upstream().breaker.fail_counter == 0
    # Without a fallback the engine's own 400 passes through unchanged.
    solo = gateway(one_model(short.base_url))
    r = post(solo.base_url, chat())
    assert r.status_code == 400
    assert r.json() == too_long


def test_truncate_policy_overflow_falls_back_to_the_longer_model(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    short = fakes(max_model_len=32)
    long = fakes(max_model_len=4096)
    data = fallback_config(short.base_url, long.base_url)
    data["policies"] = {"order": ["truncate"], "truncate": {"strategy": "reject"}}
    gw = gateway(data)
    words = " ".join(["word"] * 60)
    r = post(gw.base_url, chat(tokens=4, messages=[{"role": "user", "content": words}]))
    assert r.status_code == 200, r.text
    assert r.headers["x-vgate-upstream"] == f"{long.base_url} backup"
    assert completions(short) == 0  # nothing sent upstream just to earn its 400
    assert completions(long) == 1
    r = post(gw.base_url, chat(tokens=4))
    assert r.headers["x-vgate-upstream"] == f"{short.base_url} tiny"


async def test_a_full_connection_pool_sheds_without_counting_against_the_engine(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    # The proxy's own pool (upstream.max_connections) is full for longer than connect_timeout:
    # a local limit, like a full queue. The engine did nothing wrong: its breaker must not
    # open, the request is not retried (there is no free connection for a retry either).
    fake = fakes(defaults={"first_byte_delay": 1.0})
    gw = gateway(
        config(
            {"tiny": {"upstreams": [fake.base_url]}},
            {"breaker": {"fail_max": 2}, "retry": {"attempts": 3}},
            upstream={"max_connections": 2, "connect_timeout": 0.2},
            admin={"enabled": True, "port": 0},
        )
    )
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=10) as client:
        answers = await asyncio.gather(*(client.post(CHAT_PATH, json=chat()) for _ in range(8)))
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200] * 2 + [503] * 6, [r.text for r in answers]
        for r in answers:
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "overloaded"
                assert int(r.headers["retry-after"]) >= 1
        breaker = gw.upstream().breaker
        assert breaker.current_state == "closed"
        assert breaker.fail_counter == 0
        assert gw.upstream().failures == 0
        assert gw.upstream().inflight == 0
        assert len(fake.completions) == 2  # nothing retried
        assert (await client.post(CHAT_PATH, json=chat())).status_code == 200
    assert wait_for(gw.server, "vgate_shed_total", model="tiny", reason="pool_full") == 6
    shed = {"model": "tiny", "route": "chat/completions", "status": "503", "outcome": "shed"}
    assert family(scrape(gw.server), "vgate_requests_total")[frozenset(shed.items())] == 6
