"""The counters fed by the real pipeline stages: a retry and a fallback (resilience), a 429 (the
ratelimit policy), an engine that fails and one that cannot be reached."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.harness import ProxyServer
from tests.fakes.vllm import FakeVLLM
from tests.observability.helpers import capture_logs, family, scrape, value
from tests.resilience.conftest import closed_port_url

CHAT = "/v1/chat/completions"


def _chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def failing() -> Iterator[FakeVLLM]:
    """An engine whose completions all fail with a 500 (its /health answers)."""
    with FakeVLLM(defaults={"status": 500}) as fake:
        yield fake


@pytest.fixture
def server(fake: FakeVLLM, failing: FakeVLLM) -> ProxyServer:
    config: dict[str, Any] = {
        "server": {"drain_timeout": 1.0},
        "upstream": {"health_interval": 30.0, "metrics_interval": 30.0},
        "admin": {"enabled": True, "port": 0},
        "models": {
            # The failing engine is picked first (ties go to the first): one retry, same model.
            "tiny": {"upstreams": [failing.base_url, fake.base_url]},
            # Nothing listens there: found unhealthy at startup, the request falls back.
            "gone": {"upstreams": [closed_port_url()], "fallbacks": ["backup"]},
            "backup": {"upstreams": [fake.base_url], "served_name": "tiny"},
            "limited": {"upstreams": [fake.base_url], "served_name": "tiny"},
        },
        "policies": {"ratelimit": {"per_model": {"requests_per_minute": 1}}},
    }
    config["models"]["limited"]["policies"] = ["ratelimit"]
    return ProxyServer.from_dict(config)


def test_retry_fallback_and_rate_limit_are_counted(
    server: ProxyServer, fake: FakeVLLM, failing: FakeVLLM
) -> None:
    with server, capture_logs() as logs, httpx.Client(base_url=server.base_url, timeout=10) as c:
        r = c.post(CHAT, json=_chat("tiny"), headers={"x-request-id": "retry"})
        assert r.status_code == 200 and r.headers["x-vgate-upstream"] == f"{fake.base_url} tiny"
        r = c.post(CHAT, json=_chat("gone"), headers={"x-request-id": "fb"})
        assert r.status_code == 200
        assert r.headers["x-vgate-upstream"] == f"{fake.base_url} backup"
        assert c.post(CHAT, json=_chat("limited")).status_code == 200
        r = c.post(CHAT, json=_chat("limited"), headers={"x-request-id": "rl"})
        assert r.status_code == 429
        samples = scrape(server)
    requests = {
        (dict(k)["model"], dict(k)["status"], dict(k)["outcome"]): v
        for k, v in family(samples, "vgate_requests_total").items()
    }
    assert requests == {
        ("tiny", "200", "ok"): 1,
        ("gone", "200", "ok"): 1,
        ("limited", "200", "ok"): 1,
        ("limited", "429", "rate_limited"): 1,
    }
    assert value(samples, "vgate_retries_total", model="tiny") == 1
    assert family(samples, "vgate_retries_total").keys() == {frozenset({("model", "tiny")})}
    bad = {"model": "tiny", "upstream": failing.base_url}
    assert value(samples, "vgate_upstream_attempts_total", **bad) == 1
    assert value(samples, "vgate_upstream_failures_total", **bad) == 1
    assert value(samples, "vgate_upstream_breaker_state", **bad) == 0  # one failure of five
    good = {"model": "tiny", "upstream": fake.base_url}
    assert value(samples, "vgate_upstream_failures_total", **good) == 0
    fallback = {"model": "gone", "reason": "unhealthy", "upstream": fake.base_url}
    assert family(samples, "vgate_fallbacks_total") == {frozenset(fallback.items()): 1}
    gone = server.config.models["gone"].upstreams[0]
    assert value(samples, "vgate_upstream_healthy", model="gone", upstream=gone) == 0
    assert value(samples, "vgate_model_ready", model="gone") == 0
    assert value(samples, "vgate_queue_depth", model="tiny") == 0
    # The reason label is what the policy reports in request.outcome["rate_limited"].
    assert sum(family(samples, "vgate_rate_limited_total").values()) == 1
    lines = {line["request_id"]: line for line in logs.json() if line["msg"] == "request"}
    assert lines["retry"]["retries"] == 1 and "fallback" not in lines["retry"]
    assert lines["fb"]["fallback"] == "unhealthy"
    assert lines["fb"]["upstream"] == f"{fake.base_url} backup"
    assert (
        lines["rl"]["outcome"] == "rate_limited" and lines["rl"]["error"] == "rate_limit_exceeded"
    )
