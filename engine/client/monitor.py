"""What the proxy knows about one engine, learned in the background, never on the request path.

`EngineMonitor` probes `GET /health`, scrapes `GET /metrics` (KV cache usage, running and waiting
requests) and discovers `max_model_len` from `GET /v1/models`, each on its own interval. With a
warm-up (engine.client.warmup), a healthy engine counts as healthy only once it has answered the
warm-up request; an engine that stops answering `/health` is warmed up again when it is back
(a restarted engine is cold again). Results
are plain attributes that policies and `/ready` read without awaiting anything. Errors are
recorded in `last_error` / `metrics_error`, never raised out of `run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import httpx

from engine.client import exposition as prometheus
from engine.client import warmup as warm

log = logging.getLogger("vgate.engine")

# Newest name first: vLLM V1 renamed gpu_cache_usage_perc (also shown by the CPU build).
KV_CACHE_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
RUNNING = ("vllm:num_requests_running",)
WAITING = ("vllm:num_requests_waiting",)


class EngineMonitor:
    """Health, load and limits of the engine at `base_url` that serves `served_name`."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        served_name: str,
        *,
        health_interval: float = 5.0,
        metrics_interval: float = 2.0,
        probe_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        api_key: str | None = None,
        warmup: warm.Warmup | None = None,
    ) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.served_name = served_name
        self.health_interval = health_interval
        self.metrics_interval = metrics_interval
        # A live engine answers /health at once: a probe gets the proxy's connect timeout for
        # each phase, so a host whose link is down (nothing answers, not even a refusal) is
        # unhealthy after that, also on a pooled connection that never needs to reconnect.
        self._timeout = httpx.Timeout(min(connect_timeout, probe_timeout))
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.warmup = warmup
        self.warmed = False  # the warm-up was answered since /health last turned healthy
        self.warmed_in: float | None = None  # seconds the last warm-up took
        self.warming = False  # a warm-up request is in flight

        self.healthy: bool | None = None  # None: not probed yet
        self.last_error: str | None = None  # why the last health round failed
        self.max_model_len: int | None = None
        self.kv_cache_usage: float | None = None  # 0..1
        self.running: float | None = None
        self.waiting: float | None = None
        self.metrics_error: str | None = None
        self.updated_at: float | None = None  # time.monotonic() of the last good scrape

    async def refresh(self) -> None:
        """One round of everything (for startup, which it must not hold up: no warm-up, the
        loop of `run` sends it first thing); never raises."""
        await self.check_health(warm=False)
        await self.scrape_metrics()

    async def run(self) -> None:
        """Probe and scrape forever on their intervals; cancel the task to stop."""
        next_health = next_metrics = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_health:
                await self.check_health()
                next_health = time.monotonic() + self.health_interval
            if now >= next_metrics:
                await self.scrape_metrics()
                next_metrics = time.monotonic() + self.metrics_interval
            await asyncio.sleep(max(0.0, min(next_health, next_metrics) - time.monotonic()))

    async def check_health(self, warm: bool = True) -> None:
        """GET /health; while healthy and the window is unknown, also GET /v1/models; then the
        warm-up if one is due (`warm`) and not yet answered."""
        error: str | None = None
        try:
            response = await self._get("/health")
            if response.status_code != 200:
                error = f"/health answered {response.status_code}"
        except Exception as exc:  # a probe must survive anything the network does
            error = _describe(exc)
        if error is None and self.max_model_len is None:
            # Discovery failing leaves the engine healthy: requests work without the number.
            with contextlib.suppress(Exception):
                self.max_model_len = await self._discover_max_model_len()
        if error is not None:
            self.warmed = False
        elif self.warmup is not None and not self.warmed:
            error = await self._warm_up(self.warmup) if warm else "warming up: not sent yet"
        self._set_health(error)

    async def _warm_up(self, warmup: warm.Warmup) -> str | None:
        """Send the warm-up request; None once it is answered as it must be."""
        self.warming = True
        try:
            return await self._send_warm_up(warmup)
        finally:
            self.warming = False

    async def _send_warm_up(self, warmup: warm.Warmup) -> str | None:
        started = time.monotonic()
        problem: str | None = "no warm-up request"
        for path, body in warm.attempts(warmup, self.served_name):
            log.info("engine %s: warming up (%s)", self.base_url, path)
            try:
                response = await self.client.post(
                    self.base_url + path,
                    content=body,
                    headers={**self._headers, "Content-Type": "application/json"},
                    timeout=httpx.Timeout(warmup.timeout, connect=self._timeout.connect),
                )
            except Exception as exc:  # an engine failing its warm-up stays not ready, no more
                problem = _describe(exc)
                break
            problem = warm.problem(warmup, path, response.status_code, response.content)
            if response.status_code != 404:
                break
        if problem is not None:
            log.warning("engine %s: warm-up failed: %s", self.base_url, problem)
            return f"warming up: {problem}"
        self.warmed = True
        self.warmed_in = time.monotonic() - started
        log.info("engine %s: warmed up in %.2f s", self.base_url, self.warmed_in)
        return None

    async def scrape_metrics(self) -> None:
        """GET /metrics and keep the load gauges; on failure they become None (not stale)."""
        try:
            response = await self._get("/metrics")
            if response.status_code != 200:
                raise ValueError(f"/metrics answered {response.status_code}")
            samples = prometheus.parse(response.text)
        except Exception as exc:  # keep serving whatever the exporter does
            self.kv_cache_usage = self.running = self.waiting = None
            self.metrics_error = _describe(exc)
            return
        # Several engines behind one server (data parallel) report one sample each.
        kv = prometheus.values(samples, *KV_CACHE_USAGE)
        running = prometheus.values(samples, *RUNNING)
        waiting = prometheus.values(samples, *WAITING)
        self.kv_cache_usage = max(kv) if kv else None
        self.running = sum(running) if running else None
        self.waiting = sum(waiting) if waiting else None
        self.metrics_error = None
        self.updated_at = time.monotonic()

    async def _discover_max_model_len(self) -> int | None:
        response = await self._get("/v1/models")
        if response.status_code != 200:
            return None
        for model in response.json().get("data", []):
            if model.get("id") == self.served_name and isinstance(model.get("max_model_len"), int):
                return int(model["max_model_len"])
        return None

    async def _get(self, path: str) -> httpx.Response:
        return await self.client.get(
            self.base_url + path, headers=self._headers, timeout=self._timeout
        )

    def _set_health(self, error: str | None) -> None:
        was = self.healthy
        self.healthy = error is None
        self.last_error = error
        if not self.healthy:
            # A restarted engine may come back with a different window.
            self.max_model_len = None
        if was != self.healthy:
            if error is None:
                log.info("engine %s is healthy", self.base_url)
            elif error.startswith("warming up: not sent"):
                log.info("engine %s answers /health; not ready until warmed up", self.base_url)
            else:
                log.warning("engine %s is unhealthy: %s", self.base_url, error)


def _describe(exc: Exception) -> str:
    # A refused or unroutable connection can surface as ConnectTimeout: check connecting first.
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return f"cannot connect: {exc}"[:300]
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
