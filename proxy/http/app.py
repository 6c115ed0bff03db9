"""The Starlette application: routes, error mapping and the lifespan that owns the clients."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.core.config import Config
from proxy.core.errors import MethodNotAllowed, NotFound, VgateError, error_response
from proxy.http.endpoints import INTERNAL_ERROR, CompletionEndpoint
from proxy.runtime.runtime import Runtime
from proxy.telemetry.admin import AdminServer
from proxy.telemetry.metrics import ProxyMetrics
from proxy.telemetry.observe import Observer
from proxy.upstream.client import make_client, make_control_client


class RuntimeHolder:
    """The current Runtime; swapped whole on reload so a request sees one consistent config."""

    def __init__(self) -> None:
        self._runtime: Runtime | None = None

    def __call__(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the application has not started")
        return self._runtime

    def set(self, runtime: Runtime | None) -> None:
        self._runtime = runtime

    def peek(self) -> Runtime | None:
        """The current Runtime, or None outside the app's lifetime (for metrics scrapes)."""
        return self._runtime


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def create_app(config: Config, transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """Build the app; `transport` lets tests put a respx router or a fake under the client."""
    holder = RuntimeHolder()
    # Metrics belong to the app, not the Runtime: counters survive a config reload.
    metrics = ProxyMetrics(holder.peek)
    observer = Observer(metrics, config.logging.requests)
    admin = (
        AdminServer(config.admin.host, config.admin.port, metrics.registry.render)
        if config.admin.enabled
        else None
    )
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = make_control_client(config.upstream, transport)
        upstream_client = make_client(config.upstream, transport)
        runtime = Runtime(config, client, upstream_client)
        await runtime.start()
        holder.set(runtime)
        if admin is not None:
            await admin.start()
        try:
            yield
        finally:
            if admin is not None:
                await admin.stop()
            observer.flush()  # the last batch of request lines and counts
            await holder().stop()
            holder.set(None)
            await upstream_client.aclose()
            await client.aclose()

    async def models(request: Request) -> Response:
        rt = holder()
        # Behind auth, the list is the caller's: a key sees only the models it may use.
        key = rt.authenticate(request.headers) if rt.authenticate is not None else None
        allowed = key.allowed_models if key is not None else None
        data = []
        for name, route in rt.routes.items():
            if allowed is not None and name not in allowed:
                continue
            entry: dict[str, Any] = {
                "id": name,
                "object": "model",
                "created": started,
                "owned_by": "vgate",
            }
            lengths = [u.monitor.max_model_len for u in route.upstreams if u.monitor.max_model_len]
            if lengths:
                entry["max_model_len"] = min(lengths)
            data.append(entry)
        return _json({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        return _json({"status": "ok"})

    async def ready(request: Request) -> Response:
        rt = holder()
        problems = rt.readiness()
        # Health, breaker state and load per upstream, in both answers (proxy.runtime.runtime).
        upstreams = rt.upstream_states()
        if problems:
            return _json({"status": "not ready", "models": problems, "upstreams": upstreams}, 503)
        return _json({"status": "ready", "upstreams": upstreams})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return error_response(
                MethodNotAllowed(
                    f"Method {request.method} is not allowed on {request.url.path}.",
                    headers=exc.headers,
                )
            )
        return error_response(NotFound(f"Unknown path: {request.method} {request.url.path}."))

    async def vgate_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, VgateError)
        return error_response(exc)

    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette's ServerErrorMiddleware calls this for any unhandled exception (it logs
        # and re-raises it afterwards): an OpenAI-shaped 500 instead of plain text.
        return error_response(INTERNAL_ERROR)

    completions = {
        "/v1/chat/completions": CompletionEndpoint("chat/completions", holder, observer),
        "/v1/completions": CompletionEndpoint("completions", holder, observer),
    }
    routes = [
        *(Route(path, endpoint, methods=["POST"]) for path, endpoint in completions.items()),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            HTTPException: http_error,
            VgateError: vgate_error,
            Exception: server_error,
        },
    )
    app.router.redirect_slashes = False
    app.state.runtime = holder
    app.state.completions = completions
    app.state.metrics = metrics
    app.state.admin = admin
    return app
