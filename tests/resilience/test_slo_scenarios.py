"""The `slow_call` breaker over real sockets: a model whose engine misses its latency SLO moves
to its fallback (a smaller model) and comes back once probes are fast again.

What the breaker is told is the attempt's time to first token for a stream (not the stream's
length) and the whole answer otherwise; both are shown here against the fake engine's delays.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.fakes.vllm import FakeVLLM
from tests.observability.helpers import scrape, value
from tests.proxy.helpers import CHAT_PATH, chat
from tests.resilience.conftest import FakeFactory, Gateway, GatewayFactory, config

SLO = 0.15  # seconds: slow_call_duration
SLOW = 0.3  # what the slow engine takes, to its first token or for its whole answer


def two_models(big: FakeVLLM, small: FakeVLLM, **resilience: Any) -> dict[str, Any]:
    breaker = {
        "kind": "slow_call",
        "window_size": 4,
        "min_calls": 2,
        "slow_call_duration": SLO,
        "slow_call_rate_threshold": 0.5,
        "failure_rate_threshold": 0.5,
        "reset_timeout": 30.0,
        "half_open_calls": 1,
        **resilience.pop("breaker", {}),
    }
    return config(
        {
            "big": {"upstreams": [big.base_url], "fallbacks": ["small"]},
            "small": {"upstreams": [small.base_url]},
        },
        {"breaker": breaker, "retry": {"attempts": 1}, **resilience},
        admin={"enabled": True, "port": 0},
    )


def ask(gw: Gateway, stream: bool) -> httpx.Response:
    body = chat(stream=stream, model="big")
    r = httpx.post(gw.base_url + CHAT_PATH, json=body, timeout=10)
    assert r.status_code == 200, r.text
    if stream:
        assert r.content.rstrip().endswith(b"data: [DONE]")
    return r


def served_by(r: httpx.Response) -> str:
    return r.headers["x-vgate-upstream"].split()[-1]


def test_a_slow_first_token_opens_the_breaker_and_traffic_moves_to_the_fallback(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    big, small = fakes(model="big"), fakes(model="small")
    big.defaults = {"first_event_delay": SLOW}  # headers at once, the first token late
    gw = gateway(two_models(big, small))
    assert [served_by(ask(gw, stream=True)) for _ in range(2)] == ["big", "big"]
    breaker = gw.upstream("big").breaker
    assert breaker.current_state == "open"
    start = time.monotonic()
    moved = [ask(gw, stream=True) for _ in range(3)]
    assert [served_by(r) for r in moved] == ["small"] * 3
    assert time.monotonic() - start < 3 * SLOW  # the slow engine is no longer waited for
    assert len(big.requests_to(CHAT_PATH)) == 2
    samples = scrape(gw.server)
    assert value(samples, "vgate_upstream_breaker_state", model="big", upstream=big.base_url) == 2
    reason = {"model": "big", "reason": "breaker_open", "upstream": small.base_url}
    assert value(samples, "vgate_fallbacks_total", **reason) == 3


def test_a_long_stream_with_a_fast_first_token_is_not_slow(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    big, small = fakes(model="big"), fakes(model="small")
    big.defaults = {"token_delay": 0.05}  # ~0.25 s in all, the first token at once
    gw = gateway(two_models(big, small))
    took = []
    for _ in range(3):
        start = time.monotonic()
        assert served_by(ask(gw, stream=True)) == "big"
        took.append(time.monotonic() - start)
    assert min(took) > SLO  # each stream lasted longer than the SLO ...
    breaker = gw.upstream("big").breaker
    assert breaker.rates() == (3, 0.0, 0.0)  # ... yet none was slow: TTFT is what counts
    assert breaker.current_state == "closed"


def test_a_slow_whole_answer_is_slow(fakes: FakeFactory, gateway: GatewayFactory) -> None:
    big, small = fakes(model="big"), fakes(model="small")
    big.defaults = {"first_byte_delay": SLOW}
    gw = gateway(two_models(big, small))
    assert [served_by(ask(gw, stream=False)) for _ in range(2)] == ["big", "big"]
    assert gw.upstream("big").breaker.current_state == "open"
    assert served_by(ask(gw, stream=False)) == "small"


def test_timeouts_count_as_failures_and_open_it_too(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    big, small = fakes(model="big"), fakes(model="small")
    big.defaults = {"never_answer": True}
    gw = gateway(two_models(big, small, retry={"attempts": 2, "attempt_timeout": 0.2}))
    # Each request times out on big, then fails over to small within its attempts.
    for _ in range(2):
        assert served_by(ask(gw, stream=False)) == "small"
    breaker = gw.upstream("big").breaker
    assert breaker.current_state == "open"
    start = time.monotonic()
    assert served_by(ask(gw, stream=False)) == "small"
    assert time.monotonic() - start < 0.2  # big is skipped, not waited for
    assert len(big.requests_to(CHAT_PATH)) == 2
    assert gw.upstream("big").failures == 2


def test_fast_probes_bring_traffic_back(fakes: FakeFactory, gateway: GatewayFactory) -> None:
    big, small = fakes(model="big"), fakes(model="small")
    big.defaults = {"first_event_delay": SLOW}
    gw = gateway(two_models(big, small, breaker={"reset_timeout": 0.3}))
    for _ in range(2):
        ask(gw, stream=True)
    assert served_by(ask(gw, stream=True)) == "small"
    big.defaults = {}  # the engine is fast again
    time.sleep(0.35)
    assert served_by(ask(gw, stream=True)) == "big"  # the probe
    assert gw.upstream("big").breaker.current_state == "closed"
    assert served_by(ask(gw, stream=True)) == "big"
