"""Everything built from one config: upstream routes, engine monitors and per-model pipelines.

A reload builds a new Runtime and swaps it in; requests in flight keep the one they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.datastructures import Headers

from engine import launch
from engine.config import EngineConfig
from engine.monitor import EngineMonitor
from policies import authenticator, build_policies, close_policies
from proxy.admission import Admission
from proxy.breaker import Breaker
from proxy.config import ENGINE_PREFIX, Config, fallback_chain
from proxy.errors import ModelNotFound
from proxy.fallback import ContextFallback
from proxy.forward import Forwarder, ModelRoute, Upstream
from proxy.pipeline import Handler, KeyInfo, ProxyRequest, ProxyResponse, chain
from proxy.upstream import UpstreamClient


@dataclass(frozen=True)
class Services:
    """What policies may use, handed to them at construction (no global state)."""

    config: Config
    client: httpx.AsyncClient
    routes: dict[str, ModelRoute]
    # Resources every model's policies share (one rate-limit storage), closed by Runtime.stop.
    shared: dict[str, Any] = field(default_factory=dict)


class Runtime:
    def __init__(
        self, config: Config, client: httpx.AsyncClient, upstream_client: UpstreamClient
    ) -> None:
        self.config = config
        self.client = client  # control plane: probes, scrapes, /tokenize
        self.upstream_client = upstream_client  # the hot path
        self.monitors: dict[str, EngineMonitor] = {}
        self.routes: dict[str, ModelRoute] = {}
        resilience = config.resilience
        for name, model in config.models.items():
            bp = resilience.backpressure
            route = ModelRoute(
                name,
                admission=Admission(
                    max_inflight=bp.max_inflight,
                    queue_size=bp.queue_size,
                    max_wait=bp.max_queue_wait,
                    retry_after=bp.retry_after,
                ),
            )
            for label in model.upstreams:
                base_url = self._base_url(label)
                served = model.served_name or self._engine_served_name(label) or name
                key = f"{base_url} {served}"
                if key not in self.monitors:
                    self.monitors[key] = EngineMonitor(
                        client,
                        base_url,
                        served,
                        health_interval=config.upstream.health_interval,
                        metrics_interval=config.upstream.metrics_interval,
                        api_key=self._engine_api_key(label),
                    )
                route.add(
                    Upstream(
                        label,
                        base_url,
                        served,
                        self.monitors[key],
                        breaker=_breaker(config, label),
                        api_key=self._engine_api_key(label),
                    )
                )
            self.routes[name] = route
        self.services = services = Services(config, client, self.routes)
        chains = {name: fallback_chain(config, name) for name in config.models}
        self.forwarder = forwarder = Forwarder(
            upstream_client,
            self.routes,
            resilience,
            chains,
            max_decoded=config.upstream.max_decoded_bytes,
        )
        inner: dict[str, Handler] = {
            name: chain(build_policies(config, name, services), forwarder) for name in config.models
        }
        # A prompt too long for its model is re-run through a longer fallback model's pipeline.
        self.pipelines: dict[str, Handler] = {
            name: ContextFallback(name, chains[name][1:], inner, self.routes)
            if len(chains[name]) > 1
            else inner[name]
            for name in config.models
        }
        # Unknown models still pass the global policies first: an unauthenticated caller gets
        # 401, not a 404 that confirms which model names exist.
        global_policies = build_policies(config, None, services)
        self.unknown_model: Handler = chain(global_policies, _no_model)
        # The auth check for endpoints outside the pipelines (GET /v1/models); None: open.
        self.authenticate: Callable[[Headers], KeyInfo] | None = authenticator(global_policies)
        self._tasks: list[asyncio.Task[None]] = []

    def _engine(self, label: str) -> tuple[str, EngineConfig] | None:
        if not label.startswith(ENGINE_PREFIX):
            return None
        name = label[len(ENGINE_PREFIX) :]
        return name, self.config.engines[name]

    def _base_url(self, label: str) -> str:
        engine = self._engine(label)
        # launch.base_url reaches an engine bound to 0.0.0.0 or :: on loopback.
        return launch.base_url(engine[1]) if engine else label.rstrip("/")

    def _engine_served_name(self, label: str) -> str | None:
        # The name the engine was launched with (--served-model-name), not its model path.
        engine = self._engine(label)
        return launch.served_name(*engine) if engine else None

    def _engine_api_key(self, label: str) -> str | None:
        engine = self._engine(label)
        return (engine[1].api_key if engine else None) or self.config.upstream.api_key

    async def start(self, first_probe_timeout: float = 2.0) -> None:
        """One bounded round of probes (so /ready and /v1/models know something), then loops."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(first_probe_timeout):
                await asyncio.gather(*(m.refresh() for m in self.monitors.values()))
        self._tasks = [asyncio.create_task(m.run()) for m in self.monitors.values()]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await close_policies(self.services)

    def readiness(self) -> dict[str, str]:
        """Models without an upstream that answers, with the reason; empty when ready.

        A model whose healthy upstreams all have an open circuit breaker is not ready either
        (until the breaker lets a probe through); the reasons name each breaker's state.
        """
        problems: dict[str, str] = {}
        for name, route in self.routes.items():
            if not any(u.monitor.healthy and u.breaker.allows() for u in route.upstreams):
                reasons = "; ".join(
                    f"{u.label}: {u.monitor.last_error or _health(u)}, "
                    f"breaker {u.breaker.current_state}"
                    for u in route.upstreams
                )
                problems[name] = reasons
        return problems

    def upstream_states(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per model and upstream: health, breaker, load; for /ready and operators."""
        return {
            name: {
                u.label: {
                    "healthy": u.monitor.healthy,
                    "breaker": u.breaker.current_state,
                    "breaker_retry_in": round(u.breaker.retry_in(), 3),
                    "in_flight": u.inflight,
                    "queued": u.queued,
                    "kv_cache_usage": u.monitor.kv_cache_usage,
                }
                for u in route.upstreams
            }
            for name, route in self.routes.items()
        }


def _breaker(config: Config, label: str) -> Breaker:
    cfg = config.resilience.breaker
    return Breaker(
        label,
        # Disabled: a breaker that never opens keeps one code path for both.
        fail_max=cfg.fail_max if cfg.enabled else 2**62,
        reset_timeout=cfg.reset_timeout,
        half_open_max=cfg.half_open_max,
    )


def _health(upstream: Upstream) -> str:
    healthy = upstream.monitor.healthy
    return "not probed yet" if healthy is None else "healthy" if healthy else "unhealthy"


async def _no_model(request: ProxyRequest) -> ProxyResponse:
    raise ModelNotFound(f"The model `{request.model}` does not exist.", param="model")
