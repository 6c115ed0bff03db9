"""The route table: every path vgate answers, declared once, dispatched by proxy.http.dispatch.

A proxied route names its family (proxy.api): the body it accepts and its bounds, how its model
and usage are read, how it streams, its error shape and which policies apply all come from
there, and every proxied route gets the same pipeline, resilience, metrics and request log. A
local route is answered by the proxy itself (proxy.http.local).

Adding a route to an API vLLM serves: one line here, and a family module if its body is a new
shape. Paths not listed (vLLM's /tokenize, /metrics, its dev and admin endpoints: /sleep,
/wake_up, /collective_rpc, LoRA loading, ...) are never forwarded: they answer 404.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from proxy.api.chat import ChatCompletions
from proxy.api.completions import Completions
from proxy.core.api import Api
from proxy.http.local import LocalRoutes

LocalHandler = Callable[[LocalRoutes, Request], Awaitable[Response]]

# A path parameter vgate forwards or looks up: no "/", no dot-segments, no control characters.
PARAM = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9._:~-]{1,256}")


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # literal, or with `{name}` segments (path parameters)
    api: Api | None = None  # proxied: the family
    local: LocalHandler | None = None  # answered by the proxy itself


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/chat/completions", api=ChatCompletions()),
    Route("POST", "/v1/completions", api=Completions()),
    Route("GET", "/v1/models", local=LocalRoutes.models),
    Route("GET", "/health", local=LocalRoutes.health),
    Route("GET", "/ready", local=LocalRoutes.ready),
)


def families(routes: tuple[Route, ...] = ROUTES) -> list[Api]:
    """The distinct families of the proxied routes (the runtime builds a pipeline for each)."""
    seen: dict[str, Api] = {}
    for route in routes:
        if route.api is not None:
            seen.setdefault(route.api.name, route.api)
    return list(seen.values())
