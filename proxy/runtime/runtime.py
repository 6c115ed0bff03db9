"""Everything built from one config: upstream routes, engine monitors, attempt modules, and a
pipeline per route family and model.

A reload builds a new Runtime and swaps it in; requests in flight keep the one they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from starlette.datastructures import Headers

from policies import authenticator, build_policies, close_policies, split_at_route
from policies.services import Services
from proxy.core.api import Api, Bounds
from proxy.core.box import Box
from proxy.core.config import Config
from proxy.core.errors import ModelNotFound
from proxy.core.pipeline import Handler, KeyInfo, Policy, ProxyRequest, ProxyResponse, chain
from proxy.runtime import cache as response_cache
from proxy.runtime.context_fallback import ContextFallback
from proxy.runtime.response_ids import ResponseIds, ResponseIdStage
from proxy.runtime.upstreams import build_routes
from proxy.upstream import registry
from proxy.upstream.client import UpstreamClient
from proxy.upstream.forward import Forwarder
from proxy.upstream.model import Upstream
from proxy.upstream.wire import Tls


class Runtime:
    def __init__(
        self,
        config: Config,
        client: httpx.AsyncClient,
        upstream_client: UpstreamClient,
        apis: Sequence[Api],
        id_secret: bytes = b"",
        box: Box | None = None,
    ) -> None:
        self.config = config
        self.apis = list(apis)
        server = config.server
        self.bounds = Bounds(
            max_n=server.max_n,
            max_messages=server.max_messages,
            max_prompts=server.max_prompts,
            max_sequences=server.max_sequences,
            max_items=server.max_items,
        )
        self.client = client  # control plane: probes, scrapes, /tokenize
        self.upstream_client = upstream_client  # the hot path
        # Control-plane clients for upstreams with TLS settings of their own (closed by stop).
        self._tls_clients: dict[Tls, httpx.AsyncClient] = {}
        self.routes, self.monitors = build_routes(
            config, self._control, registry.breaker_factory(config)
        )
        self.box = box
        # The server's secret: the config's, else the box's (every worker reads every id),
        # else the process's (passed on to the runtime a reload builds, so response ids and
        # cache salts outlive reloads).
        self.id_secret = id_secret or (box.secret if box else b"") or secrets.token_bytes(32)
        configured = config.server.response_id_secret
        secret = configured.encode() if configured else self.id_secret
        self.response_ids = ResponseIds(self.routes, secret)
        self.services = services = Services(
            config,
            client,
            self.routes,
            secret=secret,
            held_by=self.response_ids.held_by,
            box=box,
        )
        modules = registry.build(config, self.routes)
        forwarder = Forwarder(
            upstream_client,
            modules,
            config.resilience.backpressure,
            affinity_messages=(
                config.resilience.affinity_messages if config.resilience.affinity == "prefix" else 0
            ),
            max_event_bytes=config.upstream.max_event_bytes,
            max_decoded_bytes=config.upstream.max_decoded_bytes,
        )
        self.forwarder = forwarder
        chains = {name: [r.name for r in modules.chains[name]] for name in config.models}
        # Answers kept for when no upstream of a chain can serve (`[cache]`); None: off.
        self.cache = response_cache.build(config.cache) if config.cache.enabled else None
        self._ids_stage = ResponseIdStage(self.response_ids)
        # Per route family, then model: each family runs the policies that apply to it.
        self.pipelines: dict[str, dict[str, Handler]] = {}
        self.unknown_model: dict[str, Handler] = {}
        for api in apis:
            inner = self._pipelines(api, forwarder)
            # A prompt too long for its model is re-run through a longer fallback's pipeline.
            self.pipelines[api.name] = {
                name: ContextFallback(name, chains[name][1:], inner, self.routes)
                if len(chains[name]) > 1
                else inner[name]
                for name in config.models
            }
            # Unknown models still pass the global policies first: an unauthenticated caller
            # gets 401, not a 404 that confirms which model names exist. A route read by id
            # has no model until its stage finds it: its pipeline ends at the forwarder.
            self.unknown_model[api.name] = chain(
                [*build_policies(config, None, services, api.policies), *self._stages(api, None)],
                forwarder if api.by_id else _no_model,
            )
        # The auth check for endpoints outside the pipelines (GET /v1/models); None: open.
        self.authenticate: Callable[[Headers], KeyInfo] | None = authenticator(
            build_policies(config, None, services, frozenset({"auth"}))
        )
        self._tasks: list[asyncio.Task[None]] = []

    def _pipelines(self, api: Api, forwarder: Handler) -> dict[str, Handler]:
        """Each model's pipeline for family `api`. With the route policy, a pipeline is cut
        after it: the policies before it run for the model asked for, the rest (and the
        forwarder) for the model in `request.model` when they run, the one `route` chose."""
        tails: dict[str, Handler] = {}
        heads: dict[str, list[Policy]] = {}
        for name in self.config.models:
            own = build_policies(self.config, name, self.services, api.policies)
            split = split_at_route(own)
            if split is None:
                tails[name] = chain([*self._front(api), *own, *self._stages(api, name)], forwarder)
            else:
                heads[name] = [*self._front(api), *split[0]]
                tails[name] = chain([*split[1], *self._stages(api, name)], forwarder)
        if not heads:
            return tails

        async def dispatch(request: ProxyRequest) -> ProxyResponse:
            return await tails[request.model](request)

        return {n: chain(heads[n], dispatch) if n in heads else tails[n] for n in tails}

    def _front(self, api: Api) -> list[Policy]:
        """Built-in stages that run before the configured policies."""
        return [response_cache.CacheHeader()] if self.cache and "cache" in api.stages else []

    def _stages(self, api: Api, model: str | None) -> list[Policy]:
        """The built-in stages a family declares (`Api.stages`), after the configured
        policies. The cache needs a model: a request for one that does not exist has none."""
        stages: list[Policy] = []
        for name in api.stages:
            if name == "response_ids":
                stages.append(self._ids_stage)
            elif name == "cache" and self.cache is not None and model is not None:
                own = response_cache.identity(self.config, self.routes[model])
                stages.append(response_cache.CacheStage(self.cache, own))
        return stages

    def _control(self, tls: Tls | None) -> httpx.AsyncClient:
        if tls is None or tls == Tls():
            return self.client  # plain http, or https with the system trust store
        client = self._tls_clients.get(tls)
        if client is None:
            client = self._tls_clients[tls] = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(verify=tls.context()),
                timeout=self.client.timeout,
                follow_redirects=False,
                trust_env=False,
            )
        return client

    def inherit(self, old: Runtime) -> None:
        """Carry what the running runtime learned of engines this one keeps (a reload): an
        engine that is warm stays warm, and is not sent another warm-up."""
        for key, monitor in self.monitors.items():
            before = old.monitors.get(key)
            if before is not None and before.warmed and before.warmup == monitor.warmup:
                monitor.warmed = True
                monitor.warmed_in = before.warmed_in

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
        if self.cache is not None:
            await self.cache.store.aclose()
        for client in self._tls_clients.values():
            await client.aclose()
        self._tls_clients.clear()

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
                    # Why the last health round failed (or "warming up: ..."); None when healthy.
                    "error": u.monitor.last_error,
                    # None: no warm-up for this upstream (a URL, or `warmup = false`).
                    "warmed_up": u.monitor.warmed if u.monitor.warmup is not None else None,
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


def _health(upstream: Upstream) -> str:
    healthy = upstream.monitor.healthy
    if upstream.monitor.warming:
        return "warming up"
    return "not probed yet" if healthy is None else "healthy" if healthy else "unhealthy"


async def _no_model(request: ProxyRequest) -> ProxyResponse:
    raise ModelNotFound(f"The model `{request.model}` does not exist.", param="model")
