"""Retry budget, backoff, admission and balancing logic (no sockets: pure logic)."""

from __future__ import annotations

import asyncio
import random

import pytest

from engine.client.monitor import EngineMonitor
from proxy.core.errors import Overloaded
from proxy.core.pipeline import Outcome
from proxy.upstream.admission import Admission
from proxy.upstream.balance import Choice, affinity_key, pick
from proxy.upstream.breaker import ConsecutiveBreaker as Breaker
from proxy.upstream.model import Upstream
from proxy.upstream.retry import RetryBudget, backoff


def upstream(label: str, inflight: int = 0, healthy: bool | None = True) -> Upstream:
    monitor = EngineMonitor(None, f"http://{label}", "m")  # type: ignore[arg-type]
    monitor.healthy = healthy
    u = Upstream(label, f"http://{label}", "m", monitor, breaker=Breaker(label, fail_max=1))
    u.inflight = inflight
    return u


# -- retry budget and backoff ------------------------------------------------------------------


def test_budget_bounds_extra_attempts_by_minimum_plus_ratio_of_requests() -> None:
    budget = RetryBudget(0.2, 3)
    spent = 0
    for _ in range(1000):
        budget.enter()
        while budget.spend():  # every request wants as many retries as it can get
            spent += 1
        budget.leave()
    assert spent <= 3 + 0.2 * 1000
    assert spent >= 0.2 * 1000 - 1


def test_budget_lets_a_lone_failure_retry_on_a_quiet_proxy() -> None:
    budget = RetryBudget(0.2, 3)
    budget.enter()
    assert budget.spend()
    budget.leave()


def test_budget_burst_scales_with_requests_in_flight() -> None:
    budget = RetryBudget(0.2, 3)
    for _ in range(500):
        budget.enter()  # 500 in flight earn up to 0.2 x 500 tokens
    assert budget.balance == pytest.approx(100.0)


def test_backoff_is_exponential_jittered_and_capped() -> None:
    rng = random.Random(7)
    draws = [[backoff(n, 0.025, 0.25, rng.uniform) for _ in range(200)] for n in (1, 2, 3, 8)]
    assert max(draws[0]) <= 0.025
    assert max(draws[1]) <= 0.05
    assert max(draws[2]) <= 0.1
    assert max(draws[3]) <= 0.25
    assert max(draws[3]) > 0.2  # the cap, not the exponent, bounds late retries
    assert len(set(draws[0])) == 200  # jittered: no two alike


# -- admission ---------------------------------------------------------------------------------


async def test_uncontended_take_and_release_touch_no_queue() -> None:
    adm = Admission(max_inflight=2)
    u = upstream("a")
    assert adm.take(u) and adm.take(u)
    assert not adm.take(u)
    adm.release(u)
    assert u.inflight == 1


async def test_a_freed_slot_goes_to_the_highest_priority_then_the_oldest_waiter() -> None:
    adm = Admission(max_inflight=1, queue_size=10, max_wait=5)
    u = upstream("a", inflight=1)
    order: list[str] = []

    async def wait(name: str, priority: int) -> None:
        await adm.wait(Outcome(), priority, 10)
        order.append(name)

    tasks = []
    for name, prio in (("low1", 0), ("high", 5), ("low2", 0)):
        tasks.append(asyncio.create_task(wait(name, prio)))
        await asyncio.sleep(0)
    assert adm.waiting == 3
    for _ in range(3):
        adm.release(u)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == ["high", "low1", "low2"]
    assert u.inflight == 1  # handed over each time, never decremented
    adm.release(u)
    assert u.inflight == 0


async def test_full_queue_sheds_the_newcomer_or_the_lowest_priority_waiter() -> None:
    adm = Admission(max_inflight=1, queue_size=2, max_wait=5, retry_after=3)
    u = upstream("a", inflight=1)
    low_outcome = Outcome()
    low = asyncio.create_task(adm.wait(low_outcome, 0, 10))
    mid = asyncio.create_task(adm.wait(Outcome(), 1, 10))
    await asyncio.sleep(0)
    outcome = Outcome()
    with pytest.raises(Overloaded) as info:
        await adm.wait(outcome, 0, 10)  # not above anyone waiting: refused at once
    assert outcome.shed == "queue_full"
    assert info.value.headers == {"retry-after": "3"}
    high = asyncio.create_task(adm.wait(Outcome(), 9, 10))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await low  # preempted by the higher priority
    assert adm.shed == {"queue_full": 1, "preempted": 1}
    assert low_outcome.shed == "preempted"  # the victim's own request says why
    adm.release(u)
    assert await high is u
    adm.release(u)
    assert await mid is u
    assert adm.waiting == 0


async def test_wait_is_bounded_and_leaves_no_trace() -> None:
    adm = Admission(max_inflight=1, queue_size=5, max_wait=0.05)
    u = upstream("a", inflight=1)
    outcome = Outcome()
    with pytest.raises(Overloaded):
        await adm.wait(outcome, 0, 10)
    assert outcome.shed == "queue_timeout"
    assert adm.waiting == 0
    adm.release(u)  # nobody waits: the slot is simply freed
    assert u.inflight == 0


async def test_cancelled_waiter_is_skipped_and_queue_stays_bounded() -> None:
    adm = Admission(max_inflight=1, queue_size=4, max_wait=5)
    u = upstream("a", inflight=1)
    for _ in range(100):
        task = asyncio.create_task(adm.wait(Outcome(), 0, 10))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert adm.waiting == 0
    assert len(adm._heap) <= 2 * 4 + 16
    adm.release(u)
    assert u.inflight == 0


# -- balancing ---------------------------------------------------------------------------------


def test_least_outstanding_skips_open_breakers_unhealthy_and_hot_kv_caches() -> None:
    a, b, c, d = (
        upstream("a", 5),
        upstream("b", 1),
        upstream("c", 0, healthy=False),
        upstream("d", 2),
    )
    b.breaker.failure(False)  # open
    d.monitor.kv_cache_usage = 0.95
    choice = Choice()
    assert pick([a, b, c, d], choice) is d
    assert pick([a, b, c, d], Choice(), kv_limit=0.85) is a
    choice = Choice()
    assert pick([b, d], choice, kv_limit=0.85) is None
    assert choice.kv_blocked
    assert pick([a, b, c, d], Choice(), unhealthy=True) is c


def test_affinity_is_stable_per_prefix_and_yields_to_load() -> None:
    ups = [upstream(name) for name in "abcd"]
    convo = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]}
    key = affinity_key(convo, 2)
    assert key is not None
    first = pick(ups, Choice(), key=key)
    longer = {"messages": [*convo["messages"], {"role": "assistant", "content": "x"}]}
    assert pick(ups, Choice(), key=affinity_key(longer, 2)) is first
    targets = {pick(ups, Choice(), key=affinity_key({"prompt": f"p{i}"}, 2)) for i in range(64)}
    assert len(targets) == 4  # different prefixes spread over every upstream
    assert first is not None
    first.inflight = 50
    assert pick(ups, Choice(), key=key) is not first
