"""What `vgate up` shows of its children once everything is ready.

The proxy logs JSON lines (for the journal); at a terminal a person wants one short line per
request, and the warnings and errors of every child, not vLLM's periodic statistics:

    06:12:01  200 ok     POST /v1/chat/completions  tiny  9+16 tokens  35.2 ms
    06:12:04  200 ok     POST /v1/chat/completions  tiny  1987+16 tokens  88.0 ms  truncated 12
    06:12:05  429 rate_limited  POST /v1/chat/completions  tiny  requests
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.core.config import Config, entries
from proxy.runtime import load
from proxy.telemetry.logs import text_escape

# vLLM's own lines: "(APIServer pid=12) WARNING 12-02 06:00:00 [file.py:1] ...".
_ENGINE_LOUD = re.compile(r"^\S*(?:\s+\S+)?\s*(WARNING|ERROR|CRITICAL)\b|Traceback|Error:")
_LOUD = frozenset({"warning", "error", "critical"})


@dataclass(frozen=True)
class Echo:
    quiet: bool = False  # no request lines (warnings and errors still)
    verbose: bool = False  # every line of every child, as it came

    def line(self, child: str, line: str) -> str | None:
        """What to print for one line of `child`'s output, or None."""
        if self.verbose:
            return f"[{child}] {line}"
        if child != "proxy":
            return f"[{child}] {line}" if _ENGINE_LOUD.search(line[:200]) else None
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            return f"[proxy] {line}"  # not a log record (a crash's stderr): always shown
        if not isinstance(record, dict):
            return None
        if record.get("logger") == "vgate.request" and record.get("msg") == "request":
            return None if self.quiet else request_line(record)
        if record.get("level") in _LOUD:
            return f"[proxy] {record['level']}: {text_escape(str(record.get('msg', '')))}"
        return None


def request_line(r: dict[str, Any]) -> str:
    """One request's record as a short line: time, status and outcome, route, model, tokens,
    latency, and what vgate did to it."""
    ts = str(r.get("ts", ""))[11:19]
    parts = [ts, f"{r.get('status')} {r.get('outcome')}", f"{r.get('method')} {r.get('path')}"]
    if r.get("model") is not None:
        parts.append(text_escape(str(r["model"])))
    prompt, completion = r.get("prompt_tokens"), r.get("completion_tokens")
    if prompt is not None or completion is not None:
        parts.append(f"{prompt or 0}+{completion or 0} tokens")
    if r.get("latency_ms") is not None:
        parts.append(f"{r['latency_ms']:.1f} ms")
    for name in ("truncated", "rate_limited", "shed", "fallback", "error"):
        if r.get(name):
            parts.append(f"{name} {r[name]}")
    return "  ".join(parts)


def banner(cfg: Config, base: str, elapsed: float) -> str:
    """What `vgate up` prints once ready: where it is, and three ways to try it."""
    model = next((n for n, m in cfg.models.items() if not _pooling(cfg, n)), next(iter(cfg.models)))
    key = "YOUR_KEY" if load.has_auth(cfg) else "unused"
    lines = [
        f"vgate is ready after {elapsed:.0f} s",
        f"  base_url: {base}/v1        models: {', '.join(cfg.models)}",
    ]
    if cfg.admin.enabled:
        admin = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(cfg.admin.host, cfg.admin.host)
        lines.append(f"  metrics:  http://{admin}:{cfg.admin.port}/metrics    (or: vgate status)")
    auth = f" -H 'Authorization: Bearer {key}'" if key != "unused" else ""
    lines += [
        "",
        "  curl (-i shows the x-ratelimit-* and x-vgate-* headers):",
        f"    curl -s {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\",
        f'      -d \'{{"model": "{model}", "max_tokens": 32, '
        f'"messages": [{{"role": "user", "content": "Hello!"}}]}}\'',
        "",
        "  the OpenAI SDK (pip install openai):",
        f'    python -c \'from openai import OpenAI; c = OpenAI(base_url="{base}/v1", '
        f'api_key="{key}"); print(c.chat.completions.create(model="{model}", max_tokens=32, '
        'messages=[{"role": "user", "content": "Hello!"}]).choices[0].message.content)\'',
        "",
        "  a coding tool or agent: point its SDK at vgate",
        f"    OpenAI-SDK tools:     export OPENAI_BASE_URL={base}/v1 OPENAI_API_KEY={key}",
        f"    Anthropic-SDK tools:  export ANTHROPIC_BASE_URL={base} ANTHROPIC_API_KEY={key}",
        f"    (and use the model name `{model}`)",
        "",
        "  One line per request follows (--quiet: none). Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def _pooling(cfg: Config, model: str) -> bool:
    """Whether `model` is served only by pooling engines (no chat to show in the examples)."""
    engines = [e.url.removeprefix("engine:") for e in entries(cfg.models[model])]
    return bool(engines) and all(
        e in cfg.engines and cfg.engines[e].runner == "pooling" for e in engines
    )
