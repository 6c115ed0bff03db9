"""The upstream side of one config: a route per model, an upstream per configured engine or URL.

Where an upstream is, which key it takes and how it is reached over TLS are decided here, once:
a URL entry's own `api_key`, else its engine's `[engines.NAME] api_key`, else `[upstream]
api_key`. Every caller (the forwarder, the engine monitor, the truncate policy's /tokenize) then
uses the upstream's own values, never the config's.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from engine import launch
from engine.client.monitor import EngineMonitor
from engine.client.warmup import Warmup
from proxy.core.config import ENGINE_PREFIX, Config, UpstreamEntry, entries
from proxy.upstream.admission import Admission
from proxy.upstream.model import ModelRoute, Upstream
from proxy.upstream.modules import Breaker
from proxy.upstream.wire import Tls


def build_routes(
    config: Config,
    control: Callable[[Tls | None], httpx.AsyncClient],
    breaker: Callable[[str], Breaker],
) -> tuple[dict[str, ModelRoute], dict[str, EngineMonitor]]:
    """Routes by model name, and the engine monitors (one per engine and served name).

    `control(tls)` is the control-plane client for an upstream's TLS settings: probes, scrapes
    and /tokenize trust exactly what the hot path trusts.
    """
    monitors: dict[str, EngineMonitor] = {}
    routes: dict[str, ModelRoute] = {}
    bp = config.resilience.backpressure
    for name, model in config.models.items():
        route = ModelRoute(
            name,
            admission=Admission(
                max_inflight=bp.max_inflight,
                queue_size=bp.queue_size,
                max_wait=bp.max_queue_wait,
                retry_after=bp.retry_after,
            ),
        )
        for entry in entries(model):
            base_url = _base_url(config, entry)
            served = model.served_name or _engine_served_name(config, entry) or name
            api_key = _api_key(config, entry)
            tls = _tls(entry)
            key = f"{base_url} {served}"
            if key not in monitors:
                monitors[key] = EngineMonitor(
                    control(tls),
                    base_url,
                    served,
                    health_interval=config.upstream.health_interval,
                    metrics_interval=config.upstream.metrics_interval,
                    connect_timeout=config.upstream.connect_timeout,
                    api_key=api_key,
                    warmup=_warmup(config, entry),
                )
            route.add(
                Upstream(
                    entry.url,
                    base_url,
                    served,
                    monitors[key],
                    breaker(entry.url),
                    api_key=api_key,
                    tls=tls,
                    priority_scheduling=_scheduling(config, entry) == "priority",
                )
            )
        routes[name] = route
    return routes, monitors


def _engine(config: Config, entry: UpstreamEntry) -> str | None:
    return entry.url[len(ENGINE_PREFIX) :] if entry.url.startswith(ENGINE_PREFIX) else None


def _base_url(config: Config, entry: UpstreamEntry) -> str:
    engine = _engine(config, entry)
    # launch.base_url reaches an engine bound to 0.0.0.0 or :: on loopback.
    return launch.base_url(config.engines[engine]) if engine else entry.url.rstrip("/")


def _engine_served_name(config: Config, entry: UpstreamEntry) -> str | None:
    # The name the engine was launched with (--served-model-name), not its model path.
    engine = _engine(config, entry)
    return launch.served_name(engine, config.engines[engine]) if engine else None


def _warmup(config: Config, entry: UpstreamEntry) -> Warmup | None:
    # Engines vgate launches are warmed up; a URL upstream is someone else's to warm.
    engine = _engine(config, entry)
    return launch.warmup_of(config.engines[engine]) if engine else None


def _scheduling(config: Config, entry: UpstreamEntry) -> str | None:
    engine = _engine(config, entry)
    return config.engines[engine].scheduling_policy if engine else entry.scheduling_policy


def _api_key(config: Config, entry: UpstreamEntry) -> str | None:
    engine = _engine(config, entry)
    own = config.engines[engine].api_key if engine else None
    return entry.api_key or own or config.upstream.api_key


def _tls(entry: UpstreamEntry) -> Tls | None:
    if not entry.url.startswith("https://"):
        return None
    return Tls(ca_file=entry.ca_file, verify=entry.verify)
