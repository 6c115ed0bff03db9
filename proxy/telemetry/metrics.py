"""vgate's metric families (one set per app) and what fills them.

For each finished request (in batches: `proxy.telemetry.observe`), `ProxyMetrics.record` adds to
counters and histograms through cached children (a dict lookup and an add each), and to the
last minute's window (`proxy.telemetry.window`, for `vgate status`). State that
already lives somewhere (upstream health, engine load, queue depth, breaker state, requests in
flight) is read at scrape time by a collector instead, so it costs nothing per request.

Labels are bounded: `model` is a configured model name or "unknown", `upstream` a configured
upstream label, `key` a configured key name, reasons short identifiers set by our own code
(others become "other"). Never a raw key, a prompt or a request id. What the stages did comes
from the request's typed `Outcome` (proxy.core.pipeline).

Scrape time reads `Upstream.inflight`, `.attempts`, `.failures`, `.breaker` (`current_state`,
`trips`, `rejected`), `ModelRoute.admission.waiting` and the engine monitors; and the process's
own figures (`proxy.telemetry.procstats`) and the event loop's task count.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from typing import Any

from proxy.core.pipeline import Outcome
from proxy.runtime.runtime import Runtime
from proxy.telemetry.cache_metrics import CacheMetrics
from proxy.telemetry.procstats import ProcReader
from proxy.telemetry.records import Finished
from proxy.telemetry.registry import Counter, Family, Gauge, Registry
from proxy.telemetry.window import RecentWindow

# Latency of LLM requests spans milliseconds (errors, tiny answers) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# pybreaker's state names and ours, as one number a dashboard can draw over time.
BREAKER_STATES = {"closed": 0, "half-open": 1, "half_open": 1, "open": 2}

OUTCOMES = (
    "ok",
    "client_error",
    "rate_limited",
    "shed",
    "upstream_error",
    "stream_failed",
    "cancelled",
    "shutdown",
    "server_error",
)
_REASON = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def reason_label(value: Any) -> str:
    """A value from `request.outcome` as a label: a short identifier, else "other"."""
    if isinstance(value, str) and _REASON.fullmatch(value):
        return value
    return "other"


def upstream_label(served_by: str | None) -> str:
    """The upstream part of `request.served_by` ("<label> <model>"); labels have no spaces."""
    return served_by.partition(" ")[0] if served_by else "none"


class ProxyMetrics:
    """The families of one app; survives config reloads (the runtime is read at scrape time)."""

    def __init__(self, runtime: Callable[[], Runtime | None]) -> None:
        self.registry = r = Registry()
        self._runtime = runtime
        self._process = ProcReader()  # process_* figures from /proc/self, read at scrape time
        self.in_flight = 0  # completion requests the endpoints are handling right now
        # The last minute, for `vgate status` (one scrape has no rates): proxy.telemetry.window.
        self.recent = RecentWindow()
        self.requests = r.counter(
            "vgate_requests_total",
            "Completion requests by model, route, final status and outcome.",
            ("model", "route", "status", "outcome"),
        )
        self.duration = r.histogram(
            "vgate_request_duration_seconds",
            "Time from request to the last byte of the answer, successful requests only.",
            ("model", "route", "stream"),
            LATENCY_BUCKETS,
        )
        self.ttft = r.histogram(
            "vgate_time_to_first_token_seconds",
            "Time from request to the first streamed byte relayed to the client.",
            ("model", "route"),
            TTFT_BUCKETS,
        )
        self.prompt_tokens = r.counter(
            "vgate_prompt_tokens_total", "Prompt tokens by key name and model.", ("key", "model")
        )
        self.completion_tokens = r.counter(
            "vgate_completion_tokens_total",
            "Completion tokens by key name and model.",
            ("key", "model"),
        )
        self.rate_limited = r.counter(
            "vgate_rate_limited_total",
            "Requests refused by rate limits, by the limit that refused them.",
            ("model", "reason"),
        )
        self.shed = r.counter(
            "vgate_shed_total", "Requests shed by backpressure, by reason.", ("model", "reason")
        )
        self.retries = r.counter(
            "vgate_retries_total", "Extra upstream attempts before the first byte.", ("model",)
        )
        self.fallbacks = r.counter(
            "vgate_fallbacks_total",
            "Requests served by a fallback, by trigger and the upstream that served.",
            ("model", "reason", "upstream"),
        )
        self.routed = r.counter(
            "vgate_routed_total",
            "Requests the route policy moved: the model asked for, the one it went to, why.",
            ("model", "target", "reason"),
        )
        self.truncations = r.counter(
            "vgate_truncations_total", "Requests whose prompt was truncated to fit.", ("model",)
        )
        self.truncated_messages = r.counter(
            "vgate_truncated_messages_total",
            "Messages dropped from prompts to fit the window.",
            ("model",),
        )
        self.queue_wait = r.histogram(
            "vgate_queue_wait_seconds",
            "Time requests waited for an upstream slot.",
            ("model",),
            QUEUE_BUCKETS,
        )
        self.stream_failures = r.counter(
            "vgate_stream_failures_total",
            "Streams that failed after their first byte, by error code.",
            ("model", "reason"),
        )
        self.upstream_errors = r.counter(
            "vgate_upstream_errors_total",
            "Requests failed by the upstream before the first byte, by error code.",
            ("model", "reason"),
        )
        self.http_refused = r.counter(
            "vgate_http_refused_total",
            "Requests refused by the HTTP layer before any handler, by reason.",
            ("reason",),
        )
        self.cache = CacheMetrics(r)
        r.collector(self._collect)

    def refused(self, reason: str) -> None:
        """One request refused by the HTTP layer (framing, head limits, timeouts, overload)."""
        self.http_refused.labels(reason).inc()

    def record(self, fin: Finished) -> None:
        """Count one finished request; `fin.label` is already bounded (configured or
        "unknown")."""
        model, route, outcome = fin.label, fin.route, fin.outcome
        self.requests.labels(model, route, fin.status, outcome).inc()
        self.recent.add(model, fin.started_at + fin.latency, fin.ttft)
        if fin.ttft is not None:
            self.ttft.labels(model, route).observe(fin.ttft)
        code = fin.error.code if fin.error is not None else None
        if outcome == "stream_failed":
            self.stream_failures.labels(model, reason_label(code)).inc()
        elif outcome == "upstream_error":
            self.upstream_errors.labels(model, reason_label(code)).inc()
        request = fin.request
        if request is None:
            return
        if outcome == "ok":
            stream = "true" if request.stream else "false"
            self.duration.labels(model, route, stream).observe(fin.latency)
        usage = request.usage
        if usage is not None:
            key = request.key.name if request.key is not None else "none"
            if usage.prompt_tokens is not None:
                self.prompt_tokens.labels(key, model).inc(usage.prompt_tokens)
            if usage.completion_tokens is not None:
                self.completion_tokens.labels(key, model).inc(usage.completion_tokens)
        details = request.outcome
        if outcome == "rate_limited":
            self.rate_limited.labels(model, reason_label(details.rate_limited)).inc()
        elif outcome == "shed":
            self.shed.labels(model, reason_label(details.shed)).inc()
        if details.retries or details.fallback or details.truncated:
            self._record_details(model, details, request.served_by)
        if details.queue_wait is not None:
            self.queue_wait.labels(model).observe(details.queue_wait)
        if details.cache is not None:
            self.cache.record(model, details.cache)
        if details.routed is not None:
            # The target is a configured model: the route policy only picks those.
            target = details.routed_to or "unknown"
            self.routed.labels(model, target, reason_label(details.routed)).inc()

    def _record_details(self, model: str, details: Outcome, served_by: str | None) -> None:
        if details.retries > 0:
            self.retries.labels(model).inc(details.retries)
        if details.fallback is not None:
            reason = reason_label(details.fallback)
            self.fallbacks.labels(model, reason, upstream_label(served_by)).inc()
        if details.truncated > 0:
            self.truncations.labels(model).inc()
            self.truncated_messages.labels(model).inc(details.truncated)

    def _collect(self) -> Iterator[Family[Any]]:
        """Gauges read from the live runtime at scrape time: no per-request cost."""
        in_flight = Gauge("vgate_requests_in_flight", "Completion requests being handled.")
        in_flight.labels().set(self.in_flight)
        yield in_flight
        yield from self._process.families()
        yield from self.recent.families()
        tasks = _loop_tasks()
        if tasks is not None:
            gauge = Gauge(
                "vgate_event_loop_tasks",
                "Asyncio tasks alive in the server's event loop (the scrape's own included).",
            )
            gauge.labels().set(tasks)
            yield gauge
        rt = self._runtime()
        if rt is None:
            return
        yield from _runtime_gauges(rt)
        yield from self.cache.collect(rt)


def _runtime_gauges(rt: Runtime) -> Iterator[Family[Any]]:
    up = ("model", "upstream")
    ready = Gauge("vgate_model_ready", "1 when some upstream of the model is healthy.", ("model",))
    queued = Gauge("vgate_queue_depth", "Requests waiting for an upstream slot.", ("model",))
    healthy = Gauge("vgate_upstream_healthy", "1 healthy, 0 failing (absent: not probed yet).", up)
    inflight = Gauge("vgate_upstream_in_flight", "Requests outstanding at the upstream.", up)
    breaker = Gauge(
        "vgate_upstream_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.", up
    )
    # Counters kept by the forwarding layer; they restart from 0 when a reload rebuilds it.
    attempts = Counter("vgate_upstream_attempts_total", "Requests sent, retries included.", up)
    failures = Counter(
        "vgate_upstream_failures_total", "Attempts failed: transport, timeout, 5xx.", up
    )
    trips = Counter("vgate_upstream_breaker_trips_total", "Times the breaker opened.", up)
    rejected = Counter(
        "vgate_upstream_breaker_rejected_total", "Calls failed fast by the breaker.", up
    )
    kv = Gauge("vgate_engine_kv_cache_usage_ratio", "Engine KV-cache usage (0..1).", up)
    running = Gauge("vgate_engine_requests_running", "Requests the engine is running.", up)
    waiting = Gauge("vgate_engine_requests_waiting", "Requests queued inside the engine.", up)
    window = Gauge("vgate_engine_max_model_len", "The engine's context window in tokens.", up)
    for name, route in rt.routes.items():
        ready.labels(name).set(1.0 if any(u.monitor.healthy for u in route.upstreams) else 0.0)
        queued.labels(name).set(route.admission.waiting)
        for u in route.upstreams:
            key = (name, u.label)
            monitor = u.monitor
            inflight.labels(*key).set(u.inflight)
            if monitor.healthy is not None:
                healthy.labels(*key).set(1.0 if monitor.healthy else 0.0)
            cb = u.breaker
            for family, value in (
                (kv, monitor.kv_cache_usage),
                (running, monitor.running),
                (waiting, monitor.waiting),
                (window, monitor.max_model_len),
                (breaker, BREAKER_STATES.get(cb.current_state)),
                (attempts, u.attempts),
                (failures, u.failures),
                (trips, cb.trips),
                (rejected, cb.rejected),
            ):
                if isinstance(value, int | float):
                    family.labels(*key).set(value)
    yield from (ready, queued, healthy, inflight, breaker, attempts, failures, trips, rejected)
    yield from (kv, running, waiting, window)


def _loop_tasks() -> int | None:
    """Tasks alive in the loop rendering the scrape (the admin listener runs on the server's
    loop); None outside a loop. A count that only grows under steady load is a leak."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return None
