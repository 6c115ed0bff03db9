"""Several proxies, several engine hosts, a real network between them, and its faults.

Six hosts on one switch (tests/net/netns.py): Redis, two `vgate serve` hosts sharing rate
limits through it, two fake engines, and the client. Faults are made in the network, not in the
engines: a switch port taken down mid-stream, a host whose packets vanish, a link that comes
back. Every test asserts what the client got, what each engine recorded and what the proxy
reports (/ready, admin /metrics), within time bounds derived from the configured timeouts
(tests/net/cluster.py: connect 0.5 s, stream idle 1 s, attempt 1 s, breaker fail_max 2 and
reset 3 s).
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, wait

import pytest

from tests.fakes.vllm import FakeVLLM
from tests.net.cluster import (
    ATTEMPT_TIMEOUT,
    CONNECT_TIMEOUT,
    HEALTH_INTERVAL,
    IDLE_TIMEOUT,
    RESET_TIMEOUT,
    Answer,
    Cluster,
    Keys,
    Proxy,
    chat_body,
    post,
    served_by,
)

pytestmark = [pytest.mark.net, pytest.mark.redis, pytest.mark.slow]

# Scheduling slack on a loaded 2-core machine (the proxy's timeout sweep alone adds <= 0.25 s).
SLACK = 1.0


def streams(
    c: Cluster, proxy: Proxy, keys: Keys, count: int, tokens: int, token_delay: float = 0.05
) -> list[Future[Answer]]:
    """`count` concurrent streams from the client host, each a conversation of its own, of
    `tokens` events `token_delay` apart."""
    return [
        c.client.submit(
            post,
            proxy.base_url,
            keys.load,
            chat_body(f"stream {i}", tokens=tokens, token_delay=token_delay),
        )
        for i in range(count)
    ]


def wait_streaming(fake: FakeVLLM, count: int, events: int = 3) -> None:
    """Until `fake` streams `count` responses, each at least `events` events in."""
    deadline = time.monotonic() + 10
    while True:
        live = [s for s in fake.streams() if s.events_sent >= events]
        if len(live) == count:
            return
        assert time.monotonic() < deadline, f"{fake.base_url}: {fake.streams()}"
        time.sleep(0.02)


def cut_mid_stream(c: Cluster, keys: Keys) -> tuple[list[Future[Answer]], float]:
    """Four streams through proxy1 (two per engine), then engine1's link goes down for good
    (the caller restores it): the streams, and when the link went down."""
    proxy = c.proxies[0]
    futures = streams(c, proxy, keys, 4, tokens=80)  # 4 s each
    for fake in c.fakes:
        wait_streaming(fake, 2)
    cut = time.monotonic()
    c.network.set_link(c.engines[0], False)
    return futures, cut


def first_done(futures: list[Future[Answer]], count: int) -> list[Answer]:
    """The first `count` answers to complete."""
    done: set[Future[Answer]] = set()
    deadline = time.monotonic() + 20
    while len(done) < count:
        assert time.monotonic() < deadline, "the streams did not end"
        done |= wait(futures, timeout=0.05, return_when=FIRST_COMPLETED).done
    return [f.result() for f in sorted(done, key=lambda f: f.result().ended_at)][:count]


def test_one_rate_limit_holds_across_both_proxy_hosts(running: Cluster, keys: Keys) -> None:
    c = running
    answers = [
        c.client.call(post, c.proxies[i % 2].base_url, keys.metered, chat_body(stream=False))
        for i in range(2 * keys.rpm)
    ]
    assert [a.status for a in answers] == [200] * keys.rpm + [429] * keys.rpm
    assert {a.body["error"]["code"] for a in answers[keys.rpm :]} == {"rate_limit_exceeded"}
    assert sum(len(fake.completions) for fake in c.fakes) == keys.rpm
    # Another key's budget is its own: the shared limit is per key, not per proxy.
    assert c.client.call(post, c.proxies[1].base_url, keys.load, chat_body()).status == 200


def test_least_outstanding_spreads_concurrent_streams_over_both_engine_hosts(
    running: Cluster, keys: Keys
) -> None:
    c = running
    answers = [f.result(20) for f in streams(c, c.proxies[0], keys, 6, tokens=40)]
    assert all(a.status == 200 and a.done and a.error is None for a in answers), answers
    assert Counter(served_by(a) for a in answers) == dict.fromkeys(c.upstreams, 3)
    for fake in c.fakes:
        assert len(fake.completions) == 3
        assert fake.seen.max_inflight == 3


def test_prefix_affinity_keeps_each_conversation_on_one_engine_host(
    running: Cluster, keys: Keys
) -> None:
    c = running
    proxy = c.proxies[1]  # affinity = "prefix"
    for n in range(6):
        messages = [{"role": "system", "content": f"You are conversation {n}."}]
        for turn in range(3):
            messages.append({"role": "user", "content": f"Question {turn}?"})
            body = {**chat_body(), "messages": messages}
            answer = c.client.call(post, proxy.base_url, keys.load, body)
            assert answer.status == 200 and answer.done, answer
            messages.append({"role": "assistant", "content": f"Answer {turn}."})
    seen = [Counter(r.body["messages"][0]["content"] for r in fake.completions) for fake in c.fakes]
    # Each conversation's three turns reached one engine, and the conversations use both
    # (without affinity, sequential requests to idle engines would all go to the first).
    assert sorted(seen[0] + seen[1]) == sorted(f"You are conversation {n}." for n in range(6))
    assert set(seen[0]).isdisjoint(seen[1])
    assert all(count == 3 for counts in seen for count in counts.values())
    assert seen[0] and seen[1]


def test_link_down_mid_stream_ends_in_an_error_event_opens_the_breaker_and_moves_traffic(
    running: Cluster, keys: Keys
) -> None:
    c = running
    proxy = c.proxies[0]
    lost, kept = c.upstreams
    futures, cut = cut_mid_stream(c, keys)
    # The lost host's two streams end first, while the other two still run.
    for a in first_done(futures, 2):
        assert served_by(a) == lost, a
        # No clean end: an error event within the idle timeout of the link going down.
        assert not a.done and a.error["code"] == "upstream_timeout", a
        assert a.ended_at - cut < IDLE_TIMEOUT + SLACK, a.ended_at - cut
    # Two counted failures (fail_max) opened the breaker.
    assert proxy.sample("vgate_upstream_breaker_state", lost) == 2
    assert proxy.sample("vgate_upstream_breaker_trips_total", lost) == 1
    assert proxy.sample("vgate_upstream_breaker_state", kept) == 0
    attempts = proxy.sample("vgate_upstream_attempts_total", lost)
    # New traffic, streams and not, goes to the other host (though it is the busier one),
    # without a single error and without even a connection attempt to the lost one.
    bodies = [chat_body(f"after {i}", stream=i % 2 == 0) for i in range(10)]
    after = [
        f.result(10) for f in [c.client.submit(post, proxy.base_url, keys.load, b) for b in bodies]
    ]
    assert all(a.status == 200 and a.error is None for a in after), after
    assert all(a.done for a in after[::2])
    assert {served_by(a) for a in after} == {kept}
    assert proxy.sample("vgate_upstream_attempts_total", lost) == attempts
    # All of it while the breaker was still open (no probe could have gone out).
    state = c.states(proxy)[lost]
    assert state["breaker"] == "open" and state["breaker_retry_in"] > 0, state
    kept_streams = [a for a in (f.result(20) for f in futures) if served_by(a) == kept]
    assert len(kept_streams) == 2
    assert all(a.done and a.error is None and len(a.events) > 80 for a in kept_streams)


def test_black_holed_host_costs_a_connect_timeout_then_is_left_out(
    running: Cluster, keys: Keys
) -> None:
    c = running
    proxy = c.proxies[0]
    dark, lit = c.upstreams
    with c.network.blackhole(c.engines[0]):
        took: list[float] = []
        while True:
            answer = c.client.call(post, proxy.base_url, keys.load, chat_body(f"n{len(took)}"))
            # Never a hang, never an error: the dark host costs at most a connect timeout.
            assert answer.status == 200 and answer.done and served_by(answer) == lit, answer
            assert answer.took < CONNECT_TIMEOUT + SLACK, answer.took
            took.append(answer.took)
            state = c.states(proxy)[dark]
            # Left out: its breaker opened, or its health probe noticed.
            if state["breaker"] == "open" or state["healthy"] is False:
                break
            assert len(took) < 5, (took, state)
        # The first request found out: its connect timed out, it moved, the breaker counted it.
        assert took[0] >= CONNECT_TIMEOUT, took
        failures = proxy.sample("vgate_upstream_failures_total", dark)
        assert failures is not None and 1 <= failures <= 2, failures  # at most fail_max
        attempts = proxy.sample("vgate_upstream_attempts_total", dark)
        answer = c.client.call(post, proxy.base_url, keys.load, chat_body("left out"))
        assert answer.status == 200 and served_by(answer) == lit, answer
        assert proxy.sample("vgate_upstream_attempts_total", dark) == attempts
    assert not c.fakes[0].completions


def test_black_hole_under_a_pooled_connection_is_bounded_by_the_attempt_timeout(
    running: Cluster, keys: Keys
) -> None:
    c = running
    proxy = c.proxies[0]
    dark, lit = c.upstreams
    # A whole answer from engine1 leaves a keep-alive connection to it in the pool.
    first = c.client.call(post, proxy.base_url, keys.load, chat_body(stream=False))
    assert served_by(first) == dark
    with c.network.blackhole(c.engines[0]):
        answer = c.client.call(post, proxy.base_url, keys.load, chat_body("again"))
    # The request went out on the pooled connection, and no answer came: the attempt timeout
    # (not the minutes of first_byte_timeout) ended that attempt, and the request moved.
    assert answer.status == 200 and answer.done and served_by(answer) == lit, answer
    assert ATTEMPT_TIMEOUT <= answer.took < ATTEMPT_TIMEOUT + SLACK, answer.took
    assert proxy.sample("vgate_upstream_failures_total", dark) == 1
    assert len(c.fakes[0].completions) == 1


def test_link_that_comes_back_closes_the_breaker_and_traffic_returns_to_both(
    running: Cluster, keys: Keys
) -> None:
    c = running
    proxy = c.proxies[0]
    back, other = c.upstreams
    futures, _ = cut_mid_stream(c, keys)
    first_done(futures, 2)  # the lost host's streams failed: its breaker is open
    asked = time.monotonic()
    state = c.states(proxy)[back]
    assert state["breaker"] == "open", state
    due = asked + state["breaker_retry_in"]  # it lets a probe through no earlier than this
    c.network.set_link(c.engines[0], True)
    up = time.monotonic()
    # Steady traffic, one request at a time: each goes to the host that came back as soon as
    # its breaker lets a probe through (the other still streams). A probe can still fail over
    # (connect timeout) if the host's ARP entry for the proxy, gone stale in the outage, is not
    # resolved yet (its own retry timer: up to a second); then the next probe closes it.
    served: list[str] = []
    while not served or served[-1] != back:
        answer = c.client.call(post, proxy.base_url, keys.load, chat_body(f"t{len(served)}"))
        assert answer.status == 200 and answer.done and answer.error is None, answer
        served.append(served_by(answer))
        assert time.monotonic() - up < 2 * RESET_TIMEOUT + SLACK, served
        time.sleep(0.05)
    assert answer.ended_at >= due, (due, answer)  # not a moment before the reset timeout
    assert proxy.sample("vgate_upstream_breaker_state", back) == 0
    assert c.states(proxy)[back]["breaker"] == "closed"
    assert c.fakes[0].completions[-1].body["messages"][0]["content"] == f"t{len(served) - 1}"
    for f in futures:
        f.result(20)
    answers = [f.result(20) for f in streams(c, proxy, keys, 4, tokens=40)]
    assert all(a.status == 200 and a.done and a.error is None for a in answers), answers
    assert Counter(served_by(a) for a in answers) == {back: 2, other: 2}


def test_a_host_whose_link_is_down_is_soon_reported_unhealthy(running: Cluster) -> None:
    c = running
    proxy = c.proxies[0]
    with c.network.link_down(c.engines[0]):
        within = HEALTH_INTERVAL + CONNECT_TIMEOUT + SLACK
        c.wait_state(proxy, c.upstreams[0], within=within, healthy=False)
