"""The application: the route table served by the dispatcher, and the lifespan that owns the
clients, the runtime and the admin listener."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import httpx
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from proxy.core.box import Box
from proxy.core.config import Config
from proxy.core.errors import VgateError
from proxy.http.dispatch import Dispatcher, Handler
from proxy.http.endpoint import INTERNAL_ERROR, ProxyEndpoint
from proxy.http.hooks import hooks
from proxy.http.ids import RequestIds
from proxy.http.local import LocalRoutes
from proxy.http.routes import ROUTES, LocalHandler, Route, families
from proxy.http.writer import send_error
from proxy.runtime.holder import RuntimeHolder
from proxy.runtime.runtime import Runtime
from proxy.telemetry.admin import AdminServer
from proxy.telemetry.metrics import ProxyMetrics
from proxy.telemetry.observe import Observer
from proxy.upstream.client import make_client, make_control_client

log = logging.getLogger("vgate.http")


@dataclass
class AppState:
    """What the server and tests reach of a running app."""

    runtime: RuntimeHolder
    metrics: ProxyMetrics
    admin: AdminServer | None


class App(Dispatcher):
    """The ASGI app `vgate serve` runs: the dispatcher over `proxy.http.routes.ROUTES`, and
    what the server and tests reach of it (`state`). A subclass, not a wrapper: no extra call
    per request."""

    state: AppState


def create_app(
    config: Config, transport: httpx.AsyncBaseTransport | None = None, box: Box | None = None
) -> App:
    """Build the app; `transport` lets tests put a respx router or a fake under the client;
    `box`: this is one worker of several (its metrics go to its supervisor's listener)."""
    holder = RuntimeHolder()
    # Metrics belong to the app, not the Runtime: counters survive a config reload.
    metrics = ProxyMetrics(holder.peek)
    observer = Observer(metrics, config.logging.requests)
    socket = box.admin_socket() if box is not None else None
    admin = (
        AdminServer(config.admin.host, config.admin.port, metrics.registry.render, socket)
        if config.admin.enabled
        else None
    )
    local = LocalRoutes(holder, int(time.time()))
    ids = RequestIds()
    apis = families(ROUTES)

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        client = make_control_client(config.upstream, transport)
        upstream_client = make_client(config.upstream, transport)
        runtime = Runtime(config, client, upstream_client, apis, box=box)
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

    def handler_for(route: Route) -> Handler:
        if route.api is not None:
            return ProxyEndpoint(route.api, holder, observer, ids)
        assert route.local is not None
        return _local(route.local, local)

    app = App(ROUTES, handler_for, lifespan)
    app.state = AppState(holder, metrics, admin)
    return app


def _local(handler: LocalHandler, local: LocalRoutes) -> Handler:
    async def serve(scope: Scope, receive: Receive, send: Send, params: Mapping[str, str]) -> None:
        try:
            response = await handler(local, Request({**scope, "path_params": params}, receive))
        except VgateError as exc:
            await send_error(send, hooks(scope), exc)
            return
        except Exception:
            log.exception("unexpected error answering %s", scope["path"])
            await send_error(send, hooks(scope), INTERNAL_ERROR)
            return
        await response(scope, receive, send)

    return serve
