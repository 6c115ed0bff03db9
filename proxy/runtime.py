"""Everything built from one config: upstream routes, engine monitors and per-model pipelines.

A reload builds a new Runtime and swaps it in; requests in flight keep the one they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import httpx

from engine.monitor import EngineMonitor
from policies import build_policies
from proxy.config import ENGINE_PREFIX, Config
from proxy.errors import ModelNotFound
from proxy.forward import Forwarder, ModelRoute, Upstream
from proxy.pipeline import Handler, ProxyRequest, ProxyResponse, chain
from proxy.upstream import UpstreamClient


@dataclass(frozen=True)
class Services:
    """What policies may use, handed to them at construction (no global state)."""

    config: Config
    client: httpx.AsyncClient
    routes: dict[str, ModelRoute]


class Runtime:
    def __init__(
        self, config: Config, client: httpx.AsyncClient, upstream_client: UpstreamClient
    ) -> None:
        self.config = config
        self.client = client  # control plane: probes, scrapes, /tokenize
        self.upstream_client = upstream_client  # the hot path
        self.monitors: dict[str, EngineMonitor] = {}
        self.routes: dict[str, ModelRoute] = {}
        for name, model in config.models.items():
            route = ModelRoute(name)
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
                        api_key=config.upstream.api_key,
                    )
                route.upstreams.append(Upstream(label, base_url, served, self.monitors[key]))
            self.routes[name] = route
        services = Services(config, client, self.routes)
        forwarder = Forwarder(upstream_client, self.routes, config.upstream.api_key)
        self.pipelines: dict[str, Handler] = {
            name: chain(build_policies(config, name, services), forwarder) for name in config.models
        }
        # Unknown models still pass the global policies first: an unauthenticated caller gets
        # 401, not a 404 that confirms which model names exist.
        self.unknown_model: Handler = chain(build_policies(config, None, services), _no_model)
        self._tasks: list[asyncio.Task[None]] = []

    def _base_url(self, label: str) -> str:
        if label.startswith(ENGINE_PREFIX):
            engine = self.config.engines[label[len(ENGINE_PREFIX) :]]
            return f"http://{engine.host}:{engine.port}"
        return label.rstrip("/")

    def _engine_served_name(self, label: str) -> str | None:
        if label.startswith(ENGINE_PREFIX):
            engine = self.config.engines[label[len(ENGINE_PREFIX) :]]
            return engine.served_name or engine.model
        return None

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

    def readiness(self) -> dict[str, str]:
        """Models without an upstream that answers, with the reason; empty when ready."""
        problems: dict[str, str] = {}
        for name, route in self.routes.items():
            if not any(u.monitor.healthy for u in route.upstreams):
                reasons = "; ".join(
                    f"{u.label}: {u.monitor.last_error or 'not probed yet'}"
                    for u in route.upstreams
                )
                problems[name] = reasons
        return problems


async def _no_model(request: ProxyRequest) -> ProxyResponse:
    raise ModelNotFound(f"The model `{request.model}` does not exist.", param="model")
