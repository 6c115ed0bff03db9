"""The end of every proxied request: classify it, count it, log one line about it.

The endpoint fills one `Finished` record per request: what it sent (status, whether a stream
started, the error, timings) and the request itself, on which the pipeline's stages left what
they did (`request.outcome`), the token counts (`request.usage`), the caller (`request.key`) and
the upstream (`request.served_by`). This module turns that into the metrics of
`proxy.telemetry.metrics` and one structured log line, in one place.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Container
from typing import Any

from proxy.core.errors import Overloaded, RateLimited, ShuttingDown, UpstreamError, VgateError
from proxy.core.pipeline import Outcome
from proxy.telemetry.logs import REQUEST_ID, flush_handlers, request_record
from proxy.telemetry.metrics import ProxyMetrics
from proxy.telemetry.records import Finished

# nginx's code for "client closed the request before any answer": nothing was sent at all.
CLIENT_CLOSED = 499
_MAX_MODEL_CHARS = 100
_MAX_VALUE_CHARS = 200
_NO_OUTCOME = Outcome()


def classify(
    status: int,
    error: VgateError | None,
    cancelled: bool,
    stream_started: bool,
    details: Outcome,
) -> str:
    """The one outcome label of a finished request (see `proxy.telemetry.metrics.OUTCOMES`)."""
    if cancelled:
        return "cancelled"
    if isinstance(error, ShuttingDown):
        return "shutdown"  # still running when the drain timeout ended
    if stream_started:
        # Headers (200) are gone: any error after them broke the stream.
        return "ok" if error is None else "stream_failed"
    if status < 400:
        return "ok"
    if details.shed is not None or isinstance(error, Overloaded):
        return "shed"
    if details.rate_limited is not None or isinstance(error, RateLimited):
        return "rate_limited"
    if isinstance(error, UpstreamError):
        return "upstream_error"
    return "server_error" if status >= 500 else "client_error"


# Counting and logging happen in batches, from a loop callback every BATCH_SECONDS, and before
# each scrape: done per request, the same Python ran cache-cold between requests and wrote one
# write(2) per line, measured at ~110 µs of CPU per request inside the server against ~45 µs
# batched. Request lines reach stderr up to BATCH_SECONDS late (their `ts` is the request's).
BATCH_SECONDS = 0.05


class Observer:
    """Records finished requests into one app's metrics and the `vgate.request` log."""

    def __init__(self, metrics: ProxyMetrics, log_requests: bool = True) -> None:
        self.metrics = metrics
        self.log = logging.getLogger("vgate.request")
        self.log_requests = log_requests
        self._pending: list[Finished] = []
        self._timer: asyncio.TimerHandle | None = None
        # A scrape sees every request that has finished, batched or not.
        metrics.registry.before_render(self.flush)

    def start(self, request_id: str) -> float:
        """A request arrived: its id goes on every log line from now on; returns the start."""
        # Each ASGI request runs in its own task with its own context: no reset needed.
        REQUEST_ID.set(request_id)
        self.metrics.in_flight += 1
        return time.perf_counter()

    def finish(self, models: Container[str], fin: Finished) -> None:
        """Called once per request by the endpoint (`models`: the configured names)."""
        self.metrics.in_flight -= 1
        now = time.perf_counter()
        fin.wall = time.time()
        fin.request_id = REQUEST_ID.get() or ""
        fin.latency = now - fin.started_at
        fin.ttft = fin.first_byte_at - fin.started_at if fin.first_byte_at else None
        if fin.cancelled and not fin.stream_started:
            fin.status = CLIENT_CLOSED
        details = fin.request.outcome if fin.request is not None else _NO_OUTCOME
        fin.outcome = classify(fin.status, fin.error, fin.cancelled, fin.stream_started, details)
        model = fin.model
        fin.label = model if model is not None and model in models else "unknown"
        self._pending.append(fin)
        if self._timer is None:
            # In a context of its own: not the one of the request that happened to schedule it.
            self._timer = asyncio.get_running_loop().call_later(
                BATCH_SECONDS, self.flush, context=contextvars.Context()
            )

    def flush(self) -> None:
        """Record what finished since the last flush (on a timer, before a scrape, at exit)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        log = self.log_requests and self.log.isEnabledFor(logging.INFO)
        record = self.metrics.record
        for fin in pending:
            record(fin)
            if log:
                self._log(fin)
        if log and pending:
            flush_handlers(self.log)

    def _log(self, fin: Finished) -> None:
        model = fin.model
        fields: dict[str, Any] = {
            "method": fin.method,
            "path": fin.path,
            # The name the client sent (bounded in length); metrics use "unknown" instead.
            "model": model[:_MAX_MODEL_CHARS] if model is not None else None,
            "status": fin.status,
            "outcome": fin.outcome,
            "latency_ms": round(fin.latency * 1000, 3),
            "ttft_ms": round(fin.ttft * 1000, 3) if fin.ttft is not None else None,
        }
        if fin.error is not None:
            fields["error"] = fin.error.code
        request = fin.request
        if request is not None:
            fields["stream"] = request.stream
            fields["key"] = request.key.name if request.key is not None else None
            fields["upstream"] = request.served_by
            usage = request.usage
            fields["prompt_tokens"] = usage.prompt_tokens if usage is not None else None
            fields["completion_tokens"] = usage.completion_tokens if usage is not None else None
            for name, value in request.outcome.reported().items():
                # Stages report names and numbers; anything else is not ours to log.
                if isinstance(value, bool | int | float) or value is None:
                    fields.setdefault(name, value)
                elif isinstance(value, str):
                    fields.setdefault(name, value[:_MAX_VALUE_CHARS])
        self.log.handle(request_record(self.log.name, "request", fin.request_id, fin.wall, fields))
