"""The one dispatcher: the route table to handlers, 404/405 in OpenAI's shape, and the lifespan.

It is the ASGI app uvicorn runs. Starlette's router and middleware stack cost about a sixth of a
proxied request's CPU (py-spy, bench/) and would give nothing here: every handler maps its own
errors, bugs included. A literal path is one dict lookup; the few templated ones (`{id}`) are
matched segment by segment, and a parameter must match `routes.PARAM` or the path is unknown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.core.errors import MethodNotAllowed, NotFound, VgateError
from proxy.http.hooks import hooks
from proxy.http.routes import PARAM, Route
from proxy.http.writer import send_error

log = logging.getLogger("vgate.http")

# A handler gets the path parameters of its route.
Handler = Callable[[Scope, Receive, Send, Mapping[str, str]], Any]
_NO_PARAMS: Mapping[str, str] = {}


class Dispatcher:
    def __init__(
        self,
        routes: Sequence[Route],
        handler_for: Callable[[Route], Handler],
        lifespan: Callable[[], AbstractAsyncContextManager[None]],
    ) -> None:
        self._literal: dict[str, dict[str, Handler]] = {}
        # (segments with None for a parameter, parameter names, method -> handler)
        self._templated: list[tuple[list[str | None], list[str], dict[str, Handler]]] = []
        for route in routes:
            handler = handler_for(route)
            if "{" not in route.path:
                self._literal.setdefault(route.path, {})[route.method] = handler
                continue
            parts = route.path.strip("/").split("/")
            pattern = [None if p.startswith("{") else p for p in parts]
            names = [p[1:-1] for p in parts if p.startswith("{")]
            for known, known_names, methods in self._templated:
                if known == pattern and known_names == names:
                    methods[route.method] = handler
                    break
            else:
                self._templated.append((pattern, names, {route.method: handler}))
        self._lifespan = lifespan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            methods = self._literal.get(path)
            params = _NO_PARAMS
            if methods is None:
                methods, params = self._match(path)
            if methods is not None:
                handler = methods.get(scope["method"])
                if handler is not None:
                    await handler(scope, receive, send, params)
                    return
                allowed = ", ".join(sorted(methods))
                exc: VgateError = MethodNotAllowed(
                    f"Method {scope['method']} is not allowed on {path}.",
                    headers={"allow": allowed},
                )
            else:
                exc = NotFound(f"Unknown path: {scope['method']} {path}.")
            await send_error(send, hooks(scope), exc)
        elif kind == "lifespan":
            await self._run_lifespan(receive, send)

    def _match(self, path: str) -> tuple[dict[str, Handler] | None, Mapping[str, str]]:
        parts = path.strip("/").split("/") if path.startswith("/") else []
        for pattern, names, methods in self._templated:
            if len(pattern) != len(parts):
                continue
            values = []
            for want, got in zip(pattern, parts, strict=True):
                if want is None:
                    if not PARAM.fullmatch(got):
                        break
                    values.append(got)
                elif want != got:
                    break
            else:
                return methods, dict(zip(names, values, strict=True))
        return None, _NO_PARAMS

    async def _run_lifespan(self, receive: Receive, send: Send) -> None:
        """ASGI lifespan: start the app's resources, then stop them at shutdown."""
        await receive()  # lifespan.startup
        context = self._lifespan()
        try:
            await context.__aenter__()
        except BaseException as exc:
            log.exception("startup failed")
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await context.__aexit__(None, None, None)
        except BaseException as exc:
            log.exception("shutdown failed")
            await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})


def asgi(app: ASGIApp) -> Handler:
    """A plain ASGI app as a handler (it ignores path parameters)."""

    async def handler(
        scope: Scope, receive: Receive, send: Send, params: Mapping[str, str]
    ) -> None:
        await app(scope, receive, send)

    return handler
