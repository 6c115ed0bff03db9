"""The `slow_call` breaker's state machine, on a controllable clock (over real sockets:
test_slo_scenarios.py)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.core.binder import ConfigError
from proxy.core.errors import CircuitOpen
from proxy.runtime.load import from_dict
from proxy.upstream.slo_breaker import SlowCallBreaker, SlowCallSettings

FAST, SLOW = 0.1, 2.0  # seconds, against slow_call_duration = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**settings: Any) -> tuple[SlowCallBreaker, Clock]:
    base: dict[str, Any] = {
        "window_size": 10,
        "min_calls": 4,
        "slow_call_duration": 1.0,
        "slow_call_rate_threshold": 0.5,
        "failure_rate_threshold": 0.5,
        "reset_timeout": 10.0,
        "half_open_calls": 2,
    }
    clock = Clock()
    return SlowCallBreaker("u", SlowCallSettings(**{**base, **settings}), clock=clock), clock


def calls(breaker: SlowCallBreaker, *outcomes: float | None) -> None:
    """Closed-state calls: a duration is an answer that took that long, None a failure."""
    for outcome in outcomes:
        assert breaker.admit() is False
        if outcome is None:
            breaker.failure(False)
        else:
            breaker.success(False, outcome)


def open_it(breaker: SlowCallBreaker) -> None:
    calls(breaker, SLOW, SLOW, SLOW, SLOW)
    assert breaker.current_state == "open"


def test_slow_calls_open_it_once_min_calls_are_on_record() -> None:
    breaker, _ = make()
    calls(breaker, SLOW, SLOW, SLOW)
    assert breaker.current_state == "closed"  # 100% slow, but only 3 of min_calls = 4
    calls(breaker, SLOW)
    assert breaker.current_state == "open"
    assert breaker.trips == 1
    assert breaker.slow_calls == 4


def test_below_the_slow_rate_it_stays_closed() -> None:
    breaker, _ = make()
    calls(breaker, FAST, FAST, SLOW, FAST, SLOW, FAST, FAST)
    assert breaker.rates() == (7, 0.0, pytest.approx(2 / 7))
    assert breaker.current_state == "closed"
    calls(breaker, SLOW, SLOW)  # 4 of 9: still below half
    assert breaker.current_state == "closed"
    calls(breaker, SLOW)  # 5 of 10
    assert breaker.current_state == "open"


def test_the_window_slides_old_slow_calls_age_out() -> None:
    breaker, _ = make(window_size=4, min_calls=4)
    calls(breaker, SLOW, FAST, FAST, FAST)  # 1 of 4
    calls(breaker, FAST, SLOW, FAST)  # the first SLOW has left: still 1 of 4
    assert breaker.rates() == (4, 0.0, 0.25)
    assert breaker.current_state == "closed"


def test_failures_still_open_it_by_their_own_rate() -> None:
    breaker, _ = make()
    calls(breaker, FAST, None, FAST, None)
    assert breaker.current_state == "open"
    assert breaker.rates() == (0, 0.0, 0.0)  # opening starts a new window


def test_a_failure_is_not_a_slow_call() -> None:
    breaker, _ = make(failure_rate_threshold=1.0)
    calls(breaker, None, None, None, FAST)
    assert breaker.rates() == (4, 0.75, 0.0)
    assert breaker.current_state == "closed"


def test_open_fails_fast_then_half_open_lets_a_bounded_number_of_probes() -> None:
    breaker, clock = make(half_open_calls=2)
    open_it(breaker)
    clock.now += 3.0
    with pytest.raises(CircuitOpen) as info:
        breaker.admit()
    assert info.value.headers["retry-after"] == "7"
    assert not breaker.allows()
    clock.now += 7.0
    assert breaker.allows()
    assert breaker.admit() is True
    assert breaker.current_state == "half-open"
    assert breaker.admit() is True
    assert not breaker.allows()
    with pytest.raises(CircuitOpen):
        breaker.admit()
    assert breaker.rejected == 2


def test_fast_probes_close_it_with_an_empty_window() -> None:
    breaker, clock = make(half_open_calls=2)
    open_it(breaker)
    clock.now += 10.0
    breaker.admit(), breaker.admit()
    breaker.success(True, FAST)
    assert breaker.current_state == "half-open"  # one slow probe would still be half
    breaker.success(True, FAST)
    assert breaker.current_state == "closed"
    calls(breaker, SLOW, SLOW, SLOW)  # a new window: min_calls again before it opens
    assert breaker.current_state == "closed"


def test_a_slow_probe_reopens_it_as_soon_as_the_round_is_lost() -> None:
    breaker, clock = make(half_open_calls=2)
    open_it(breaker)
    clock.now += 10.0
    breaker.admit(), breaker.admit()
    breaker.success(True, SLOW)  # 1 of 2 slow reaches the 0.5 threshold, whatever comes next
    assert breaker.current_state == "open"
    assert breaker.trips == 2
    breaker.success(True, FAST)  # the other probe, late: changes nothing
    assert breaker.current_state == "open"
    assert breaker.retry_in() == 10.0


def test_a_failed_probe_reopens_it() -> None:
    breaker, clock = make(half_open_calls=1)
    open_it(breaker)
    clock.now += 10.0
    assert breaker.admit() is True
    breaker.failure(True)
    assert breaker.current_state == "open"


def test_a_released_probe_frees_its_place() -> None:
    breaker, clock = make(half_open_calls=1)
    open_it(breaker)
    clock.now += 10.0
    assert breaker.admit() is True
    assert not breaker.allows()
    breaker.release(True)  # the client left: no outcome
    assert breaker.admit() is True
    breaker.success(True, FAST)
    assert breaker.current_state == "closed"


def test_a_probe_that_never_answers_stops_holding_its_place_after_reset_timeout() -> None:
    breaker, clock = make(half_open_calls=1)
    open_it(breaker)
    clock.now += 10.0
    assert breaker.admit() is True
    clock.now += 9.9
    with pytest.raises(CircuitOpen):
        breaker.admit()
    clock.now += 0.1
    assert breaker.admit() is True


def test_late_outcomes_from_before_it_opened_are_ignored() -> None:
    breaker, clock = make()
    assert breaker.admit() is False  # admitted while closed, answers after the trip
    open_it(breaker)
    breaker.success(False, FAST)
    breaker.failure(False)
    assert breaker.current_state == "open"
    clock.now += 10.0
    breaker.admit()
    breaker.success(False, SLOW)  # not a probe
    assert breaker.current_state == "half-open"


def test_disabled_it_counts_but_never_opens() -> None:
    breaker, _ = make(enabled=False)
    calls(breaker, *([SLOW] * 12))
    assert breaker.current_state == "closed"
    assert breaker.rates() == (10, 0.0, 1.0)
    assert breaker.slow_calls == 12


def test_config_binds_it_and_check_config_names_the_keys() -> None:
    base = {"models": {"tiny": {"upstreams": ["http://127.0.0.1:9"]}}}
    cfg = from_dict({**base, "resilience": {"breaker": {"kind": "slow_call", "min_calls": 2}}})
    assert cfg.resilience.breaker["kind"] == "slow_call"
    bad = {
        "kind": "slow_call",
        "window_size": 5,
        "min_calls": 6,
        "slow_call_rate_threshold": 1.5,
    }
    with pytest.raises(ConfigError) as info:
        from_dict({**base, "resilience": {"breaker": bad}})
    assert "resilience.breaker.slow_call_rate_threshold: must be in (0, 1]" in info.value.problems
    with pytest.raises(ConfigError) as info:
        from_dict({**base, "resilience": {"breaker": {"kind": "slow_call", "fail_max": 3}}})
    assert any(
        p.startswith("resilience.breaker.fail_max: unknown key") for p in info.value.problems
    )
    with pytest.raises(ConfigError) as info:
        from_dict({**base, "resilience": {"breaker": {**bad, "slow_call_rate_threshold": 0.5}}})
    assert any(
        p.startswith("resilience.breaker.min_calls: 6 is more than window_size (5)")
        for p in info.value.problems
    ), info.value.problems
