"""EngineMonitor against an in-memory engine (httpx.MockTransport): every failure it must survive.

The same monitor runs against the real vLLM server in test_real_engine.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx
import pytest

from engine.client.monitor import EngineMonitor

METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 2.0
vllm:num_requests_running{engine="1",model_name="tiny"} 1.0
vllm:num_requests_waiting{engine="0",model_name="tiny"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="tiny"} 0.75
"""
MODELS = {
    "object": "list",
    "data": [
        {"id": "other", "object": "model", "max_model_len": 512},
        {"id": "tiny", "object": "model", "max_model_len": 2048},
    ],
}


class Engine:
    """A scripted engine: per-path responses (or exceptions), and every request seen."""

    def __init__(self) -> None:
        self.seen: list[httpx.Request] = []
        self.routes: dict[str, Callable[[], httpx.Response]] = {
            "/health": lambda: httpx.Response(200),
            "/metrics": lambda: httpx.Response(200, text=METRICS),
            "/v1/models": lambda: httpx.Response(200, json=MODELS),
        }

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return self.routes[request.url.path]()

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))


def refused() -> httpx.Response:
    raise httpx.ConnectError("connection refused")


async def test_one_round_reads_health_limits_and_load() -> None:
    engine = Engine()
    async with engine.client() as client:
        mon = EngineMonitor(client, "http://engine:8000/", "tiny")
        assert mon.healthy is None
        await mon.refresh()
    assert mon.healthy is True and mon.last_error is None
    assert mon.max_model_len == 2048
    assert (mon.running, mon.waiting, mon.kv_cache_usage) == (3.0, 4.0, 0.75)
    assert mon.updated_at is not None and mon.metrics_error is None
    assert [r.url.path for r in engine.seen] == ["/health", "/v1/models", "/metrics"]


async def test_max_model_len_is_discovered_once_while_healthy() -> None:
    engine = Engine()
    async with engine.client() as client:
        mon = EngineMonitor(client, "http://engine:8000", "tiny")
        await mon.check_health()
        await mon.check_health()
    assert [r.url.path for r in engine.seen].count("/v1/models") == 1


async def test_unhealthy_engine_and_recovery_are_logged_once_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = Engine()
    caplog.set_level(logging.INFO, logger="vgate.engine")
    async with engine.client() as client:
        mon = EngineMonitor(client, "http://e", "tiny")
        engine.routes["/health"] = lambda: httpx.Response(503)
        await mon.check_health()
        await mon.check_health()
        assert mon.healthy is False and mon.last_error == "/health answered 503"
        assert mon.max_model_len is None
        engine.routes["/health"] = refused
        await mon.check_health()
        assert mon.last_error is not None and "cannot connect" in mon.last_error
        engine.routes["/health"] = lambda: httpx.Response(200)
        await mon.check_health()
    assert mon.healthy is True and mon.last_error is None and mon.max_model_len == 2048
    changes = [r.getMessage().split(" is ", 1)[1] for r in caplog.records]
    assert [c.split(":")[0] for c in changes] == ["unhealthy", "healthy"]


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (lambda: httpx.Response(500, text="boom"), "/metrics answered 500"),
        (lambda: httpx.Response(200, text='vllm:num_requests_running{x="1 2\n'), "metrics line 1"),
        (refused, "cannot connect"),
    ],
)
async def test_failed_scrape_clears_gauges_instead_of_keeping_stale_ones(
    response: Callable[[], httpx.Response], error: str
) -> None:
    engine = Engine()
    async with engine.client() as client:
        mon = EngineMonitor(client, "http://e", "tiny")
        await mon.scrape_metrics()
        assert mon.running == 3.0
        engine.routes["/metrics"] = response
        await mon.scrape_metrics()
    assert (mon.running, mon.waiting, mon.kv_cache_usage) == (None, None, None)
    assert mon.metrics_error is not None and error in mon.metrics_error


async def test_older_vllm_metric_name_and_missing_gauges() -> None:
    engine = Engine()
    engine.routes["/metrics"] = lambda: httpx.Response(200, text="vllm:gpu_cache_usage_perc 0.3\n")
    async with engine.client() as client:
        mon = EngineMonitor(client, "http://e", "tiny")
        await mon.scrape_metrics()
    assert mon.kv_cache_usage == 0.3
    assert mon.running is None and mon.waiting is None


async def test_api_key_is_sent_as_bearer() -> None:
    engine = Engine()
    async with engine.client() as client:
        await EngineMonitor(client, "http://e", "tiny", api_key="k-1").refresh()
    assert {r.headers.get("authorization") for r in engine.seen} == {"Bearer k-1"}


async def test_run_keeps_going_through_errors_on_both_intervals() -> None:
    engine = Engine()
    calls = {"n": 0}

    def flaky() -> httpx.Response:
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("anything at all")
        return httpx.Response(200, text=METRICS)

    engine.routes["/metrics"] = flaky
    async with engine.client() as client:
        mon = EngineMonitor(client, "http://e", "tiny", health_interval=0.05, metrics_interval=0.01)
        task = asyncio.create_task(mon.run())
        await asyncio.sleep(0.3)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    paths = [r.url.path for r in engine.seen]
    assert paths.count("/metrics") > paths.count("/health") >= 3
    assert calls["n"] >= 6
