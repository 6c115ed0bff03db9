"""The one dispatcher: the route table to handlers, 404/405 in OpenAI's shape, and the lifespan.

It is the ASGI app uvicorn runs. Starlette's router and middleware stack cost about a sixth of a
proxied request's CPU (py-spy, bench/) and would give nothing here: every handler maps its own
errors, bugs included. A literal path is one dict lookup; the few templated ones (`{id}`) are
matched segment by segment on the path as sent (each segment decoded on its own), and a
parameter must match `routes.PARAM` or the path is unknown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import unquote

from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.core.errors import MethodNotAllowed, NotFound, VgateError
from proxy.http.hooks import hooks
from proxy.http.routes import PARAM, REST, Route
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
        # (segments with None for a parameter, parameter names, whether the last parameter
        # takes the rest of the path, method -> handler)
        self._templated: list[tuple[list[str | None], list[str], bool, dict[str, Handler]]] = []
        for route in routes:
            handler = handler_for(route)
            if "{" not in route.path:
                self._literal.setdefault(route.path, {})[route.method] = handler
                continue
            parts = route.path.strip("/").split("/")
            rest = parts[-1].endswith("...}")
            pattern = [None if p.startswith("{") else p for p in parts]
            names = [p[1:-1].removesuffix("...") for p in parts if p.startswith("{")]
            for known, known_names, known_rest, methods in self._templated:
                if (known, known_names, known_rest) == (pattern, names, rest):
                    methods[route.method] = handler
                    break
            else:
                self._templated.append((pattern, names, rest, {route.method: handler}))
        self._lifespan = lifespan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            methods = self._literal.get(path)
            params = _NO_PARAMS
            if methods is None:
                methods, params = self._match(scope.get("raw_path") or path.encode())
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

    def _match(self, raw: bytes) -> tuple[dict[str, Handler] | None, Mapping[str, str]]:
        # Segments are split on the path as sent, then each is decoded: an encoded "/" (the
        # OpenAI SDK sends `meta-llama%2FLlama-3` for a hub-style model) stays inside its
        # segment, and cannot make one segment into several.
        raw = raw.partition(b"?")[0]
        parts = (
            [unquote(p.decode("latin-1")) for p in raw.strip(b"/").split(b"/")]
            if raw.startswith(b"/")
            else []
        )
        for pattern, names, rest, methods in self._templated:
            size = len(pattern)
            if len(parts) < size if rest else len(parts) != size:
                continue
            got = [*parts[: size - 1], "/".join(parts[size - 1 :])] if rest else parts
            values = []
            for i, (want, value) in enumerate(zip(pattern, got, strict=True)):
                if want is None:
                    last = rest and i == size - 1
                    if not (REST if last else PARAM).fullmatch(value):
                        break
                    values.append(value)
                elif want != value:
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
