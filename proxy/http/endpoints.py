"""The completion endpoints as raw ASGI apps: the hot path, kept free of per-request objects."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
from collections.abc import Callable, Mapping

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.core.errors import (
    ShuttingDown,
    UpstreamTimeout,
    VgateError,
    error_body,
    sse_error_event,
)
from proxy.core.pipeline import ProxyRequest, ProxyResponse, RequestHeaders
from proxy.http.body import ClientGone, check_completion_request, parse_json_object, read_body
from proxy.http.guard import Deadlines, Guard
from proxy.http.hooks import ConnectionHooks, hooks
from proxy.runtime.runtime import Runtime
from proxy.telemetry.observe import CLIENT_CLOSED, Observer

log = logging.getLogger("vgate.endpoints")

INTERNAL_ERROR = VgateError("The server had an error while processing your request.")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SSE_HEADERS = [
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class RequestIds:
    """A valid incoming X-Request-ID is kept (for tracing across hops); otherwise a new one.

    New ids are a random per-process prefix and a counter: unique across restarts and
    processes sharing a Redis, and a fraction of the cost of fresh randomness per request.
    They identify, they do not authorise: being predictable costs nothing.
    """

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(6)
        self._next = itertools.count(1).__next__

    def __call__(self, headers: Headers) -> str:
        incoming = headers.get("x-request-id")
        if incoming and _REQUEST_ID.fullmatch(incoming):
            return incoming
        return f"{self._prefix}{self._next():012x}"


class CompletionEndpoint:
    """POST /v1/chat/completions and /v1/completions."""

    def __init__(
        self, route: str, runtime: Callable[[], Runtime], observer: Observer | None = None
    ) -> None:
        self.route = route
        self.runtime = runtime
        self.observer = observer
        self.request_id = RequestIds()
        self.deadlines = Deadlines()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rt = self.runtime()
        server = rt.config.server
        headers = RequestHeaders(scope=scope)
        conn = hooks(scope)
        rid = self.request_id(headers)
        obs = self.observer
        t0 = obs.start(rid) if obs is not None else 0.0
        model: str | None = None
        try:
            body = await read_body(receive, headers, server.max_body_bytes)
            data = parse_json_object(body)
            model, stream = check_completion_request(
                self.route, data, max_n=server.max_n, max_messages=server.max_messages
            )
            pipeline = rt.pipelines.get(model, rt.unknown_model)
        except ClientGone:
            if obs is not None:
                obs.finish(
                    rt.pipelines, self.route, model, None, CLIENT_CLOSED, None, True, False, t0
                )
            return
        except Exception as exc:
            failure = _as_error(exc, "reading", rid)
            try:
                await _send_error(send, conn, failure, rid, {})
            finally:
                if obs is not None:
                    obs.finish(
                        rt.pipelines,
                        self.route,
                        model,
                        None,
                        failure.status,
                        failure,
                        False,
                        False,
                        t0,
                    )
            return
        except BaseException as exc:
            if obs is not None:
                # Cancelled (server stopping) while reading, or a bug: recorded either way.
                gone = isinstance(exc, asyncio.CancelledError)
                obs.finish(rt.pipelines, self.route, model, None, 500, None, gone, False, t0)
            raise
        request = ProxyRequest(self.route, model, data, headers, rid, stream)
        upstream = rt.config.upstream
        guard = Guard(
            scope,
            receive,
            self.deadlines,
            upstream.first_byte_timeout,
            upstream.stream_idle_timeout,
        )
        started = cancelled = False
        status = 500  # until an answer is known: an exception escaping here is a bug
        error: VgateError | None = None
        try:
            response = await pipeline(request)
            status = response.status
            if response.stream is None:
                guard.close()
                await _send_whole(send, conn, request, response)
            else:
                started = True
                await _send_stream(send, request, response, guard)
        except asyncio.CancelledError as exc:
            reason = guard.absorb(exc)
            cancelled = reason is None or reason == "disconnect"
            if reason is None:
                raise
            if reason != "disconnect":
                error = (
                    ShuttingDown("The server is shutting down; retry the request.")
                    if reason == "shutdown"
                    else UpstreamTimeout(
                        "The upstream sent nothing within the first-byte timeout."
                        if reason == "first_byte_timeout"
                        else "The upstream stream went silent beyond the idle timeout."
                    )
                )
                status = status if started else error.status
                await _fail(send, conn, error, request, started)
        except Exception as exc:
            error = _as_error(exc, "serving", rid)
            status = status if started else error.status
            await _fail(send, conn, error, request, started)
        finally:
            guard.close()
            if obs is not None:
                obs.finish(
                    rt.pipelines,
                    self.route,
                    model,
                    request,
                    status,
                    error,
                    cancelled,
                    started,
                    t0,
                    guard.first_byte_at,
                )


def _as_error(exc: Exception, doing: str, rid: str) -> VgateError:
    """A vgate error as it is; anything else is a bug: logged with its traceback, and the
    client gets a generic OpenAI-shaped 500 (or an error event on a started stream), never
    Starlette's plain text or internals."""
    if isinstance(exc, VgateError):
        return exc
    log.exception("unexpected error %s request %s", doing, rid)
    return INTERNAL_ERROR


async def _fail(
    send: Send, conn: ConnectionHooks | None, exc: VgateError, request: ProxyRequest, started: bool
) -> None:
    if started:
        # Headers are gone: end with an error event and no [DONE], never a clean-looking end.
        await send({"type": "http.response.body", "body": sse_error_event(exc), "more_body": False})
    else:
        await _send_error(send, conn, exc, request.request_id, request.response_headers)


async def _send_error(
    send: Send, conn: ConnectionHooks | None, exc: VgateError, rid: str, extra: dict[str, str]
) -> None:
    await _send_whole(
        send,
        conn,
        None,
        ProxyResponse(exc.status, "application/json", error_body(exc), headers=exc.headers),
        rid=rid,
        extra=extra,
    )


def _raw_headers(
    response: ProxyResponse, rid: str, extra: dict[str, str], served_by: str | None
) -> list[tuple[bytes, bytes]]:
    raw = [
        (b"content-type", response.content_type.encode("latin-1")),
        (b"x-request-id", rid.encode("latin-1")),
    ]
    if served_by:
        raw.append((b"x-vgate-upstream", served_by.encode("latin-1")))
    for source in (extra, response.headers):
        raw.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in source.items())
    return raw


async def _send_whole(
    send: Send,
    conn: ConnectionHooks | None,
    request: ProxyRequest | None,
    response: ProxyResponse,
    rid: str = "",
    extra: dict[str, str] | None = None,
) -> None:
    if request is not None:
        rid, extra, served_by = request.request_id, request.response_headers, request.served_by
    else:
        served_by = None
    headers = _raw_headers(response, rid, extra or {}, served_by)
    headers.append((b"content-length", str(len(response.body)).encode()))
    uncork = conn.cork() if conn is not None else None
    try:
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})
    finally:
        if uncork is not None:
            uncork()


async def _send_stream(
    send: Send, request: ProxyRequest, response: ProxyResponse, guard: Guard
) -> None:
    assert response.stream is not None
    headers = _raw_headers(
        response, request.request_id, request.response_headers, request.served_by
    )
    headers.extend(_SSE_HEADERS)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    stream = response.stream
    try:
        async for chunk in stream:
            if guard.started:
                guard.touch()
            else:
                guard.arm_idle()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
    guard.close()
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class HotPaths:
    """Dispatch the completion routes before any of Starlette's layers (the server runs this).

    Starlette's middleware stack and router cost about a sixth of a proxied request's CPU
    (py-spy, bench/) and give these endpoints nothing: they map every error themselves, bugs
    included. Every other request, lifespan events, and these paths with another method (405)
    go to the Starlette app, which also routes the completions itself when run directly.
    """

    def __init__(self, app: ASGIApp, endpoints: Mapping[str, ASGIApp]) -> None:
        self.app = app
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.endpoints.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.app(scope, receive, send)
