"""The breaker wrapper's logic, on a controllable clock (the socket-level scenarios are in
test_upstream_scenarios.py)."""

from __future__ import annotations

import asyncio
import time

import pybreaker
import pytest

from proxy.core.errors import CircuitOpen
from proxy.upstream.breaker import ConsecutiveBreaker as Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(fail_max: int = 3, reset: float = 10.0, probes: int = 1) -> tuple[Breaker, Clock]:
    clock = Clock()
    return Breaker(
        "u", fail_max=fail_max, reset_timeout=reset, half_open_max=probes, clock=clock
    ), clock


async def test_pybreaker_alone_counts_a_failing_coroutine_as_a_success() -> None:
    # Why proxy.upstream.breaker exists: the library's own call() sees the coroutine object, not
    # its end.
    cb = pybreaker.CircuitBreaker(fail_max=1)

    async def failing() -> None:
        raise ConnectionError

    with pytest.raises(ConnectionError):
        await cb.call(failing)
    assert cb.current_state == "closed"
    assert cb.fail_counter == 0


def test_failures_count_and_open_at_fail_max() -> None:
    breaker, _ = make(fail_max=3)
    for expected in (1, 2):
        assert breaker.admit() is False
        breaker.failure(False)
        assert breaker.fail_counter == expected
        assert breaker.current_state == "closed"
    breaker.admit()
    breaker.failure(False)
    assert breaker.current_state == "open"
    assert breaker.trips == 1


def test_open_fails_fast_with_retry_after() -> None:
    breaker, clock = make(fail_max=1, reset=10.0)
    breaker.failure(False)
    clock.now += 2.5
    start = time.perf_counter()
    with pytest.raises(CircuitOpen) as info:
        breaker.admit()
    assert time.perf_counter() - start < 0.01
    assert info.value.status == 503
    assert info.value.headers["retry-after"] == "8"
    assert breaker.rejected == 1
    assert not breaker.allows()


def test_success_resets_the_consecutive_count() -> None:
    breaker, _ = make(fail_max=3)
    breaker.failure(False)
    breaker.failure(False)
    breaker.success(False)
    assert breaker.fail_counter == 0
    breaker.failure(False)
    breaker.failure(False)
    assert breaker.current_state == "closed"


def test_release_counts_nothing() -> None:
    breaker, _ = make(fail_max=2)
    breaker.failure(False)
    breaker.release(False)  # a client cancellation: neither a failure nor a success
    assert breaker.fail_counter == 1


def test_half_open_lets_a_bounded_number_of_probes_through() -> None:
    breaker, clock = make(fail_max=1, reset=5.0, probes=2)
    breaker.failure(False)
    clock.now += 5.0
    assert breaker.allows()
    assert breaker.admit() is True
    assert breaker.current_state == "half-open"
    assert breaker.admit() is True
    for _ in range(10):
        with pytest.raises(CircuitOpen):
            breaker.admit()
    breaker.success(True)
    assert breaker.current_state == "closed"
    # The other probe finishing later changes nothing.
    breaker.failure(True)
    assert breaker.current_state == "closed"
    assert breaker.fail_counter == 0


def test_failed_probe_reopens_and_restarts_the_timer() -> None:
    breaker, clock = make(fail_max=1, reset=5.0)
    breaker.failure(False)
    clock.now += 6.0
    assert breaker.admit() is True
    breaker.failure(True)
    assert breaker.current_state == "open"
    assert breaker.trips == 2
    assert breaker.retry_in() == pytest.approx(5.0)
    clock.now += 4.0
    with pytest.raises(CircuitOpen):
        breaker.admit()
    clock.now += 1.0
    assert breaker.admit() is True


def test_cancelled_probe_frees_its_place_without_deciding() -> None:
    breaker, clock = make(fail_max=1, reset=5.0)
    breaker.failure(False)
    clock.now += 5.0
    assert breaker.admit() is True
    breaker.release(True)
    assert breaker.current_state == "half-open"
    assert breaker.admit() is True


def test_late_outcomes_of_calls_admitted_before_opening_change_nothing() -> None:
    breaker, clock = make(fail_max=1, reset=5.0)
    breaker.admit()
    breaker.admit()
    breaker.failure(False)
    assert breaker.current_state == "open"
    opened_for = breaker.retry_in()
    clock.now += 1.0
    breaker.failure(False)  # must not restart the reset timer
    breaker.success(False)  # must not close it
    assert breaker.current_state == "open"
    assert breaker.retry_in() == pytest.approx(opened_for - 1.0)


async def test_an_awaited_attempt_is_counted_by_its_outcome() -> None:
    # The forwarder's pattern: admit, await the attempt, replay its outcome.
    breaker, _ = make(fail_max=2)

    async def attempt(fail: bool) -> None:
        await asyncio.sleep(0)
        if fail:
            raise ConnectionError

    for _ in range(2):
        probe = breaker.admit()
        try:
            await attempt(fail=True)
        except ConnectionError:
            breaker.failure(probe)
    assert breaker.current_state == "open"


def test_a_hung_probe_stops_blocking_after_the_reset_timeout() -> None:
    breaker, clock = make(fail_max=1, reset=5.0, probes=1)
    breaker.failure(False)
    clock.now += 5.0
    assert breaker.admit() is True  # this probe never answers
    clock.now += 4.9
    with pytest.raises(CircuitOpen):
        breaker.admit()
    clock.now += 0.1
    assert breaker.allows()
    assert breaker.admit() is True
    breaker.success(True)
    assert breaker.current_state == "closed"
