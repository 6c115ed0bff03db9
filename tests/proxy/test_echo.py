"""What `vgate up` shows once ready (proxy.ops.echo): a line per request, the warnings."""

from __future__ import annotations

import orjson

from proxy.ops.echo import Echo, banner
from proxy.runtime import load
from tests.fakes.harness import proxy_config

REQUEST = {
    "ts": "2026-12-02T06:12:01.123Z",
    "level": "info",
    "logger": "vgate.request",
    "msg": "request",
    "method": "POST",
    "path": "/v1/chat/completions",
    "model": "tiny",
    "status": 200,
    "outcome": "ok",
    "latency_ms": 35.21,
    "prompt_tokens": 1987,
    "completion_tokens": 16,
    "truncated": 12,
}


def test_a_request_record_is_one_short_line() -> None:
    shown = Echo().line("proxy", orjson.dumps(REQUEST).decode())
    assert shown == (
        "06:12:01  200 ok  POST /v1/chat/completions  tiny  1987+16 tokens  35.2 ms  truncated 12"
    )
    refused = {**REQUEST, "status": 429, "outcome": "rate_limited", "rate_limited": "requests"}
    del refused["prompt_tokens"], refused["completion_tokens"], refused["truncated"]
    line = Echo().line("proxy", orjson.dumps(refused).decode())
    assert line is not None and line.endswith("rate_limited requests")


def test_quiet_drops_request_lines_but_not_warnings() -> None:
    quiet = Echo(quiet=True)
    assert quiet.line("proxy", orjson.dumps(REQUEST).decode()) is None
    warning = {"level": "warning", "logger": "vgate.engine", "msg": "engine down\nfake line"}
    assert quiet.line("proxy", orjson.dumps(warning).decode()) == (
        "[proxy] warning: engine down\\nfake line"  # client text cannot start a line
    )
    info = {"level": "info", "logger": "uvicorn.error", "msg": "Started server process"}
    assert quiet.line("proxy", orjson.dumps(info).decode()) is None


def test_engine_lines_show_only_when_loud_unless_verbose() -> None:
    stats = "(APIServer pid=12) INFO 12-02 06:00:00 [loggers.py:1] Avg prompt throughput: 0.0"
    warning = "(APIServer pid=12) WARNING 12-02 06:00:00 [x.py:1] low memory"
    assert Echo().line("engine tiny", stats) is None
    assert Echo().line("engine tiny", warning) == f"[engine tiny] {warning}"
    assert Echo(verbose=True).line("engine tiny", stats) == f"[engine tiny] {stats}"
    assert Echo().line("proxy", "Traceback (most recent call last):") is not None


def test_the_banner_has_the_urls_and_three_ways_to_try_it() -> None:
    cfg = load.from_dict(proxy_config("http://127.0.0.1:9", admin={"enabled": True}))
    text = banner(cfg, "http://127.0.0.1:8080", 41.2)
    assert "base_url: http://127.0.0.1:8080/v1" in text
    assert "http://127.0.0.1:9464/metrics" in text
    assert "curl -s http://127.0.0.1:8080/v1/chat/completions" in text
    assert 'OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")' in text
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:8080 " in text
    keys = {"keys": [{"name": "k", "sha256": "0" * 64}]}
    locked = load.from_dict(
        proxy_config("http://127.0.0.1:9", policies={"order": ["auth"], "auth": keys})
    )
    text = banner(locked, "http://127.0.0.1:8080", 1)
    assert "Authorization: Bearer YOUR_KEY" in text and "metrics" not in text
