"""The routes the proxy answers itself: /health, /ready and the model list."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from proxy.core.errors import ModelNotFound
from proxy.runtime.holder import RuntimeHolder
from proxy.upstream.model import ModelRoute


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


class LocalRoutes:
    """Handlers of the local routes in proxy.http.routes (raise a VgateError to refuse)."""

    def __init__(self, holder: RuntimeHolder, started: int) -> None:
        self.holder = holder
        self.started = started  # the `created` of every model entry

    def _visible(self, request: Request) -> dict[str, ModelRoute]:
        """The caller's models: behind auth, a key sees only the models it may use."""
        rt = self.holder()
        key = rt.authenticate(request.headers) if rt.authenticate is not None else None
        allowed = key.allowed_models if key is not None else None
        return {n: r for n, r in rt.routes.items() if allowed is None or n in allowed}

    def _entry(self, name: str, route: ModelRoute) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": self.started,
            "owned_by": "vgate",
        }
        window = route.window()
        if window is not None:
            entry["max_model_len"] = window
        return entry

    async def models(self, request: Request) -> Response:
        routes = self._visible(request)
        data = [self._entry(name, route) for name, route in routes.items()]
        return _json({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        """One model, or 404 for a model that is not configured or that the key may not use
        (the same answer: a key learns nothing of models it cannot use)."""
        name = request.path_params["model"]
        route = self._visible(request).get(name)
        if route is None:
            raise ModelNotFound(f"The model `{name}` does not exist.", param="model")
        return _json(self._entry(name, route))

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
