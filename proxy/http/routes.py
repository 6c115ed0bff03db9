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
from proxy.api.messages import CountTokens, Messages
from proxy.api.pooling import Embeddings, Rerank, Score
from proxy.api.responses import ResponseCancel, ResponseRetrieve, Responses
from proxy.core.api import Api
from proxy.http.local import LocalRoutes

LocalHandler = Callable[[LocalRoutes, Request], Awaitable[Response]]

# A path parameter vgate forwards or looks up: no "/", no dot-segments, no control characters;
# a last `{name...}` parameter takes the rest of the path (only ever looked up, never forwarded).
PARAM = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9._:~-]{1,256}")
REST = re.compile(r"[^\x00-\x1f\x7f]{1,512}")


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # literal, or with `{name}` segments (path parameters)
    api: Api | None = None  # proxied: the family
    local: LocalHandler | None = None  # answered by the proxy itself


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/chat/completions", api=ChatCompletions()),
    Route("POST", "/v1/completions", api=Completions()),
    Route("POST", "/v1/responses", api=Responses()),
    Route("GET", "/v1/responses/{id}", api=ResponseRetrieve()),
    Route("POST", "/v1/responses/{id}/cancel", api=ResponseCancel()),
    Route("POST", "/v1/messages", api=Messages()),
    Route("POST", "/v1/messages/count_tokens", api=CountTokens()),
    Route("POST", "/v1/embeddings", api=Embeddings()),
    Route("POST", "/v1/rerank", api=Rerank()),
    Route("POST", "/v1/score", api=Score()),
    Route("GET", "/v1/models", local=LocalRoutes.models),
    # A model name may hold "/" (a hub-style name): the rest of the path, looked up in config.
    Route("GET", "/v1/models/{model...}", local=LocalRoutes.model),
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
