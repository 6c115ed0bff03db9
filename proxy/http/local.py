"""The routes the proxy answers itself: /health, /ready and the model list."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from proxy.runtime.holder import RuntimeHolder


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


class LocalRoutes:
    """Handlers of the local routes in proxy.http.routes (raise a VgateError to refuse)."""

    def __init__(self, holder: RuntimeHolder, started: int) -> None:
        self.holder = holder
        self.started = started  # the `created` of every model entry

    async def models(self, request: Request) -> Response:
        rt = self.holder()
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
                "created": self.started,
                "owned_by": "vgate",
            }
            window = route.window()
            if window is not None:
                entry["max_model_len"] = window
            data.append(entry)
        return _json({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        rt = self.holder()
        problems = rt.readiness()
        # Health, breaker state and load per upstream, in both answers (proxy.runtime).
        upstreams = rt.upstream_states()
        if problems:
            return _json({"status": "not ready", "models": problems, "upstreams": upstreams}, 503)
        return _json({"status": "ready", "upstreams": upstreams})
