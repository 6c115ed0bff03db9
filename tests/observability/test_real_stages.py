"""The counters fed by the real pipeline stages: a fallback with a retry (resilience), a 429
(the ratelimit policy), an upstream that cannot be reached, and truncation of nothing."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.fakes.harness import ProxyServer
from tests.fakes.vllm import FakeVLLM
from tests.observability.helpers import capture_logs, family, scrape, value

CHAT = "/v1/chat/completions"


def _dead_url() -> str:
    # A port that was free a moment ago: connections to it are refused.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def server(fake: FakeVLLM) -> ProxyServer:
    dead = _dead_url()
    config = {
        "server": {"drain_timeout": 1.0},
        "upstream": {"health_interval": 30.0, "metrics_interval": 30.0, "connect_timeout": 2.0},
        "admin": {"enabled": True, "port": 0},
        "models": {
            "tiny": {"upstreams": [dead], "fallbacks": ["backup"]},
            "backup": {"upstreams": [fake.base_url], "served_name": "tiny"},
            "limited": {"upstreams": [fake.base_url], "served_name": "tiny"},
        },
        "policies": {
            "order": [],
            "ratelimit": {"per_model": {"requests_per_minute": 1}},
        },
    }
    config["models"]["limited"]["policies"] = ["ratelimit"]  # type: ignore[index]
    return ProxyServer.from_dict(config)


def test_fallback_retry_and_rate_limit_are_counted(server: ProxyServer, fake: FakeVLLM) -> None:
    with server, capture_logs() as logs, httpx.Client(base_url=server.base_url, timeout=10) as c:
        r = c.post(CHAT, json=_chat("tiny"), headers={"x-request-id": "fb"})
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
        ("limited", "200", "ok"): 1,
        ("limited", "429", "rate_limited"): 1,
    }
    fallbacks = family(samples, "vgate_fallbacks_total")
    key = frozenset({"model": "tiny", "reason": "unreachable", "upstream": fake.base_url}.items())
    assert fallbacks == {key: 1}
    assert value(samples, "vgate_retries_total", model="tiny") == 1
    # The reason is what the policy reports in request.outcome["rate_limited"].
    assert sum(family(samples, "vgate_rate_limited_total").values()) == 1
    dead = {"model": "tiny", "upstream": server.config.models["tiny"].upstreams[0]}
    assert value(samples, "vgate_upstream_attempts_total", **dead) == 1
    assert value(samples, "vgate_upstream_failures_total", **dead) == 1
    assert value(samples, "vgate_upstream_breaker_state", **dead) == 0  # one failure of five
    assert value(samples, "vgate_queue_depth", model="tiny") == 0
    lines = {line["request_id"]: line for line in logs.json() if line["msg"] == "request"}
    assert lines["fb"]["fallback"] == "unreachable" and lines["fb"]["retries"] == 1
    assert lines["fb"]["upstream"] == f"{fake.base_url} backup"
    assert lines["rl"]["outcome"] == "rate_limited" and lines["rl"]["status"] == 429
