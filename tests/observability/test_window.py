"""The proxy's last-minute window (proxy.telemetry.window), on a clock the test moves."""

from __future__ import annotations

import random

import pytest

from engine.client import exposition as prometheus
from proxy.telemetry.registry import Registry
from proxy.telemetry.window import RecentWindow


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_counts_only_the_last_minute_and_says_what_it_covers() -> None:
    clock = Clock(1000.25)
    window = RecentWindow(60, clock)
    assert window.covered(clock.now) == 0.0
    for i in range(90):  # one request a second from 1000 to 1089
        window.add("tiny", 1000.5 + i, None)
    clock.now = 1089.75
    requests, ttft = window.summary(clock.now)["tiny"]
    # The current second (1089) and the 59 before it: requests 1030..1089.
    assert requests == 60
    assert ttft == {}
    assert window.covered(clock.now) == pytest.approx(59.75)
    # A minute of silence empties it; a request of another model has its own count.
    clock.now = 1150.0
    window.add("other", 1149.9, 0.2)
    summary = window.summary(clock.now)
    assert summary["tiny"] == (0, {})
    assert summary["other"][0] == 1


def test_a_request_older_than_its_slot_is_dropped() -> None:
    window = RecentWindow(60, Clock(2000.0))
    window.add("tiny", 1999.5, None)
    window.add("tiny", 1939.5, None)  # same slot, a minute older: not in the window
    assert window.summary(2000.0)["tiny"][0] == 1


def test_started_recently_covers_only_since_the_start() -> None:
    clock = Clock(500.0)
    window = RecentWindow(60, clock)
    clock.now = 512.5
    assert window.covered(clock.now) == pytest.approx(12.5)


def test_ttft_quantiles_are_within_a_few_per_cent() -> None:
    rng = random.Random(7)
    values = sorted(rng.lognormvariate(-2.0, 1.0) for _ in range(5000))
    window = RecentWindow(60, Clock(100.0))
    for v in values:
        window.add("tiny", 99.5, v)
    _, quantiles = window.summary(100.0)["tiny"]
    for q, found in quantiles.items():
        exact = values[int(q * len(values)) - 1]
        assert found == pytest.approx(exact, rel=0.05), q


def test_exposed_as_gauges_that_parse() -> None:
    clock = Clock(100.0)
    window = RecentWindow(60, clock)
    registry = Registry()
    registry.collector(window.families)
    window.add("tiny", 99.1, 0.05)
    window.add("tiny", 99.2, None)
    clock.now = 100.5
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for s in prometheus.parse(registry.render().decode())
    }
    assert samples[("vgate_recent_window_seconds", ())] == 0.5
    assert samples[("vgate_recent_requests", (("model", "tiny"),))] == 2
    p50 = samples[("vgate_recent_ttft_seconds", (("model", "tiny"), ("quantile", "0.5")))]
    assert p50 == pytest.approx(0.05, rel=0.1)
