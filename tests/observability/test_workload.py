"""A scripted workload through the real proxy (real sockets, the fake vLLM): exact counters on
the admin /metrics, one JSON log line per request with its id, and nothing secret anywhere.

Rate limiting, shedding and fallback are driven by a tiny test-only policy that sets
`request.outcome` the way those stages document it, so the accounting is proven independently of
the policies that will set them for real.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
import orjson
import pytest

import policies
from policies.auth import new_key
from proxy.core.errors import Overloaded, RateLimited
from proxy.core.pipeline import Handler, ProxyRequest, ProxyResponse
from tests.fakes.harness import ProxyServer, proxy_config
from tests.fakes.vllm import FakeVLLM, prompt_tokens
from tests.observability.helpers import (
    LineCapture,
    admin_url,
    capture_logs,
    family,
    scrape,
    value,
    wait_for,
)
from tests.proxy.helpers import RawClient, chat

CHAT = "/v1/chat/completions"
SECRET_PROMPT = "PURPLE-ELEPHANT-4242 remembers the launch code"


@dataclass(frozen=True)
class _NoSettings:
    pass


class OutcomePolicy:
    """Test-only: does to `request.outcome` what the x-test-outcome header asks."""

    settings_class: ClassVar[type[Any]] = _NoSettings
    model_overrides: ClassVar[frozenset[str] | None] = frozenset()

    def __init__(self, settings: Any, model: str | None, services: Any) -> None:
        self.log = logging.getLogger("vgate.test_policy")

    @classmethod
    def problems(cls, settings: Any, config: Any) -> list[str]:
        return []

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        what = request.headers.get("x-test-outcome")
        if what == "rate_limited":
            request.outcome.rate_limited = "tokens"
            raise RateLimited("Rate limit reached for tokens.", headers={"retry-after": "1"})
        if what == "shed":
            request.outcome.shed = "queue_full"
            raise Overloaded("Upstream queue is full.", headers={"retry-after": "1"})
        if what == "fallback":
            self.log.warning("first choice refused, falling back")
            outcome = request.outcome
            outcome.fallback, outcome.retries, outcome.truncated = "breaker_open", 2, 3
            outcome.queue_wait = 0.02
        return await call_next(request)


@pytest.fixture
def key() -> tuple[str, str]:
    return new_key()


@pytest.fixture
def server(
    fake: FakeVLLM, key: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[ProxyServer]:
    monkeypatch.setitem(policies.REGISTRY, "test_outcome", OutcomePolicy)
    config = proxy_config(
        fake.base_url,
        admin={"enabled": True, "port": 0},
        logging={"level": "debug"},
        # One attempt per request: the counts below assume the 500 is not retried.
        resilience={"retry": {"attempts": 1}},
        policies={
            "order": ["auth", "test_outcome"],
            "auth": {"keys": [{"name": "alice", "sha256": key[1]}]},
        },
    )
    with ProxyServer.from_dict(config) as srv:
        yield srv


def test_workload_counters_logs_and_redaction(
    server: ProxyServer, fake: FakeVLLM, key: tuple[str, str]
) -> None:
    raw_key, digest = key
    auth = {"authorization": f"Bearer {raw_key}"}
    expected: Counter[tuple[str, str, str, str]] = Counter()
    ids: dict[str, str] = {}  # request id -> expected outcome
    prompt = completion = 0
    chat_route, completions_route = "chat/completions", "completions"

    with capture_logs() as logs, httpx.Client(base_url=server.base_url, timeout=10) as client:

        def post(rid: str, body: Any, path: str = CHAT, **headers: str) -> httpx.Response:
            content = body if isinstance(body, bytes) else orjson.dumps(body)
            hdrs = {"x-request-id": rid, "content-type": "application/json", **headers}
            return client.post(path, content=content, headers=hdrs)

        for i in range(3):
            r = post(f"ok-{i}", chat(4), **auth)
            assert r.status_code == 200 and r.headers["x-request-id"] == f"ok-{i}"
            prompt, completion = prompt + prompt_tokens(chat(4)), completion + 4
            expected["tiny", chat_route, "200", "ok"] += 1
            ids[f"ok-{i}"] = "ok"

        body = chat(5, stream=True, stream_options={"include_usage": True})
        r = post("stream-usage", body, **auth)
        assert r.status_code == 200 and b"[DONE]" in r.content
        prompt, completion = prompt + prompt_tokens(body), completion + 5
        # Usage is counted even when the client did not ask for it (the proxy always does).
        body = chat(3, stream=True)
        r = post("stream-plain", body, **auth)
        assert r.status_code == 200 and b'"usage"' not in r.content
        prompt, completion = prompt + prompt_tokens(body), completion + 3
        expected["tiny", chat_route, "200", "ok"] += 2
        ids |= {"stream-usage": "ok", "stream-plain": "ok"}

        body = {"model": "tiny", "prompt": "a b c", "max_tokens": 2}
        r = post("completion", body, path="/v1/completions", **auth)
        assert r.status_code == 200
        prompt, completion = prompt + prompt_tokens(body), completion + 2
        expected["tiny", completions_route, "200", "ok"] += 1
        ids["completion"] = "ok"

        # 4xx: unknown model, malformed JSON, no key, and the upstream's own 400.
        assert post("nope", {**chat(), "model": "nope"}, **auth).status_code == 404
        expected["unknown", chat_route, "404", "client_error"] += 1
        assert post("bad-json", b"{not json", **auth).status_code == 400
        expected["unknown", chat_route, "400", "client_error"] += 1
        assert post("no-key", chat()).status_code == 401
        expected["tiny", chat_route, "401", "client_error"] += 1
        upstream_400 = {"status": 400, "body": {"error": {"message": "bad", "type": "x"}}}
        assert post("up-400", chat(fake=upstream_400), **auth).status_code == 400
        expected["tiny", chat_route, "400", "client_error"] += 1
        assert post("up-500", chat(fake={"status": 500}), **auth).status_code == 502
        expected["tiny", chat_route, "502", "upstream_error"] += 1
        ids |= {"nope": "client_error", "bad-json": "client_error", "no-key": "client_error"}
        ids |= {"up-400": "client_error", "up-500": "upstream_error"}

        # A stream that breaks after it started: 200 sent, then an error event.
        r = post("broken", chat(8, stream=True, fake={"reset_after_events": 2}), **auth)
        assert r.status_code == 200 and b"upstream_stream_broken" in r.content
        expected["tiny", chat_route, "200", "stream_failed"] += 1
        ids["broken"] = "stream_failed"

        # Policies' refusals and a fallback, as their stages report them in request.outcome.
        r = post("limited", chat(), **auth, **{"x-test-outcome": "rate_limited"})
        assert r.status_code == 429
        assert post("shed", chat(), **auth, **{"x-test-outcome": "shed"}).status_code == 503
        r = post("fallback", chat(4), **auth, **{"x-test-outcome": "fallback"})
        assert r.status_code == 200
        prompt, completion = prompt + prompt_tokens(chat(4)), completion + 4
        expected["tiny", chat_route, "429", "rate_limited"] += 1
        expected["tiny", chat_route, "503", "shed"] += 1
        expected["tiny", chat_route, "200", "ok"] += 1
        ids |= {"limited": "rate_limited", "shed": "shed", "fallback": "ok"}

        # The secret-bearing request: key and prompt must appear nowhere.
        secret = {"model": "tiny", "messages": [{"role": "user", "content": SECRET_PROMPT}]}
        r = post("secret", {**secret, "max_tokens": 2}, **auth)
        assert r.status_code == 200
        prompt, completion = prompt + prompt_tokens({**secret}), completion + 2
        expected["tiny", chat_route, "200", "ok"] += 1
        ids["secret"] = "ok"

        # Cancelled mid-stream (client leaves after the first event) and before any byte.
        with RawClient(server.base_url) as raw:
            body = chat(50, stream=True, fake={"token_delay": 0.05})
            raw.send("POST", CHAT, orjson.dumps(body), {"x-request-id": "gone-mid", **auth})
            raw.read_until(b"data: ")
        with RawClient(server.base_url) as raw:
            body = chat(fake={"first_byte_delay": 5})
            raw.send("POST", CHAT, orjson.dumps(body), {"x-request-id": "gone-early", **auth})
            _wait_until(lambda: _seen(fake, "gone-early"))
        expected["tiny", chat_route, "200", "cancelled"] += 1
        expected["tiny", chat_route, "499", "cancelled"] += 1
        ids |= {"gone-mid": "cancelled", "gone-early": "cancelled"}
        for status in ("499", "200"):
            labels = {"model": "tiny", "route": chat_route, "status": status}
            wait_for(server, "vgate_requests_total", outcome="cancelled", **labels)
        samples = scrape(server)
        metrics_text = httpx.get(admin_url(server) + "/metrics").text

    # -- counters, exactly ------------------------------------------------------------------
    requests = {
        tuple(dict(labels)[k] for k in ("model", "route", "status", "outcome")): v
        for labels, v in family(samples, "vgate_requests_total").items()
    }
    assert requests == dict(expected)
    assert value(samples, "vgate_prompt_tokens_total", key="alice", model="tiny") == prompt
    assert value(samples, "vgate_completion_tokens_total", key="alice", model="tiny") == completion
    assert value(samples, "vgate_rate_limited_total", model="tiny", reason="tokens") == 1
    assert value(samples, "vgate_shed_total", model="tiny", reason="queue_full") == 1
    assert value(samples, "vgate_retries_total", model="tiny") == 2
    fallbacks = family(samples, "vgate_fallbacks_total")
    assert fallbacks == {
        frozenset({"model": "tiny", "reason": "breaker_open", "upstream": fake.base_url}.items()): 1
    }
    assert value(samples, "vgate_truncations_total", model="tiny") == 1
    assert value(samples, "vgate_truncated_messages_total", model="tiny") == 3
    assert value(samples, "vgate_queue_wait_seconds_count", model="tiny") == 1
    broken = {"model": "tiny", "reason": "upstream_stream_broken"}
    assert value(samples, "vgate_stream_failures_total", **broken) == 1
    # Successful requests only: ok-0..2, fallback and secret; two streams; one completion.
    duration = "vgate_request_duration_seconds_count"
    assert value(samples, duration, model="tiny", route=chat_route, stream="false") == 5
    assert value(samples, duration, model="tiny", route=chat_route, stream="true") == 2
    assert value(samples, duration, model="tiny", route=completions_route, stream="false") == 1
    # First byte relayed: two good streams, the broken one and the one cancelled mid-way.
    ttft = "vgate_time_to_first_token_seconds_count"
    assert value(samples, ttft, model="tiny", route=chat_route) == 4
    assert value(samples, "vgate_requests_in_flight") == 0
    up = {"model": "tiny", "upstream": fake.base_url}
    assert value(samples, "vgate_upstream_in_flight", **up) == 0
    assert value(samples, "vgate_engine_max_model_len", **up) == fake.max_model_len
    assert value(samples, "vgate_upstream_healthy", **up) == 1
    assert value(samples, "vgate_model_ready", model="tiny") == 1

    # -- one JSON line per request, with its id, on every line about it --------------------
    lines = logs.json()
    per_request = [line for line in lines if line["msg"] == "request"]
    assert Counter(line["request_id"] for line in per_request) == Counter(dict.fromkeys(ids, 1))
    by_id = {line["request_id"]: line for line in per_request}
    for rid, outcome in ids.items():
        assert by_id[rid]["outcome"] == outcome, by_id[rid]
        assert by_id[rid]["level"] == "info" and by_id[rid]["path"].startswith("/v1/")
    ok = by_id["ok-0"]
    assert ok["status"] == 200 and ok["model"] == "tiny" and ok["key"] == "alice"
    assert ok["prompt_tokens"] == prompt_tokens(chat(4)) and ok["completion_tokens"] == 4
    assert ok["upstream"] == f"{fake.base_url} tiny" and ok["latency_ms"] > 0
    assert ok["ttft_ms"] is None and by_id["stream-usage"]["ttft_ms"] > 0
    assert by_id["broken"]["error"] == "upstream_stream_broken"
    assert by_id["gone-early"]["status"] == 499
    assert by_id["limited"]["rate_limited"] == "tokens" and by_id["limited"]["status"] == 429
    assert by_id["fallback"]["fallback"] == "breaker_open" and by_id["fallback"]["retries"] == 2
    policy_lines = [line for line in lines if line["logger"] == "vgate.test_policy"]
    assert [line.get("request_id") for line in policy_lines] == ["fallback"]

    # -- redaction: neither the key, nor its digest, nor the prompt, anywhere -----------------
    everything = "\n".join(logs.lines) + "\n" + metrics_text
    assert "alice" in everything and "secret" in by_id  # the scan looks at the right text
    for needle in (raw_key, digest, hashlib.sha256(raw_key.encode()).hexdigest(), "PURPLE"):
        assert needle not in everything
    assert SECRET_PROMPT.split()[1] not in everything  # "remembers": no fragment either


def _seen(fake: FakeVLLM, rid: str) -> bool:
    return any(s.headers.get("x-request-id") == rid for s in fake.seen.requests)


def _wait_until(predicate: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.01)


def test_log_capture_sees_json(server: ProxyServer) -> None:
    # Guards the test above: the capture uses the JSON formatter the config installed.
    with capture_logs() as logs:
        logging.getLogger("vgate.x").info("hello", extra={"fields": {"n": 1}})
    (line,) = logs.json()
    assert line["msg"] == "hello" and line["n"] == 1 and line["logger"] == "vgate.x"
    assert isinstance(logs, LineCapture)


def test_request_ids_are_kept_or_made_sent_upstream_and_logged(
    server: ProxyServer, fake: FakeVLLM, key: tuple[str, str]
) -> None:
    auth = {"authorization": f"Bearer {key[0]}"}
    with capture_logs() as logs, httpx.Client(base_url=server.base_url, timeout=10) as client:
        kept = client.post(CHAT, json=chat(), headers={"x-request-id": "trace-1.a:b", **auth})
        made = client.post(CHAT, json=chat(), headers={"x-request-id": "has spaces", **auth})
        scrape(server)  # records what is still batched
    assert kept.headers["x-request-id"] == "trace-1.a:b"
    new = made.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{24}", new)
    upstream = [s.headers.get("x-request-id") for s in fake.seen.requests if s.method == "POST"]
    assert upstream == ["trace-1.a:b", new]
    lines = [line for line in logs.json() if line["msg"] == "request"]
    assert [line["request_id"] for line in lines] == ["trace-1.a:b", new]
