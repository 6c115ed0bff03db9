"""A proxied route: read and check the body, run the family's pipeline, send what comes back.

One class serves every proxied route; what differs between routes is the family
(proxy.core.api.Api). Kept as a raw ASGI handler: the hot path, free of per-request objects
beyond the request itself. Every request ends in one `finally` that hands its `Finished`
record to the observer, however it ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from starlette.types import Receive, Scope, Send

from proxy.core.api import Api
from proxy.core.errors import ShuttingDown, UpstreamTimeout, VgateError
from proxy.core.pipeline import ProxyRequest, ProxyResponse, RequestHeaders
from proxy.http.body import ClientGone, parse_json_object, read_body
from proxy.http.guard import Deadlines, Guard, Reason
from proxy.http.hooks import ConnectionHooks, hooks
from proxy.http.ids import RequestIds
from proxy.http.writer import Header, error_event, send_error, send_whole
from proxy.runtime.runtime import Runtime
from proxy.telemetry.observe import Observer
from proxy.telemetry.records import Finished

log = logging.getLogger("vgate.endpoints")

INTERNAL_ERROR = VgateError("The server had an error while processing your request.")
_SSE_HEADERS = [
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class ProxyEndpoint:
    def __init__(
        self, api: Api, runtime: Callable[[], Runtime], observer: Observer, ids: RequestIds
    ) -> None:
        self.api = api
        self.runtime = runtime
        self.observer = observer
        self.ids = ids
        self.deadlines = Deadlines()

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, params: Mapping[str, str]
    ) -> None:
        rt = self.runtime()
        headers = RequestHeaders(scope=scope)
        rid = self.ids(headers)
        api = self.api
        fin = Finished(api.name, scope["method"], scope["path"], self.observer.start(rid))
        try:
            # The read phase: the body, parsed and checked (bounds included) by the family.
            try:
                body = await read_body(receive, headers, rt.config.server.max_body_bytes)
                # A route read by id (GET, or a cancel) may come without a body at all.
                data = parse_json_object(body) if body or not api.by_id else {}
                model, stream = api.read(data, rt.bounds)
                query = _query(scope, api.query) if api.query else ""
                if query and "stream=true" in query.split("&"):
                    stream = True
            except ClientGone:
                fin.cancelled = True
                return
            except Exception as exc:
                fin.error = _as_error(exc, "reading", rid)
                fin.status = fin.error.status
                await send_error(send, hooks(scope), fin.error, api.errors, _base(rid))
                return
            fin.model = model
            request = ProxyRequest(api, model, data, headers, rid, stream, params=params)
            request.query = query
            await self._serve(scope, receive, send, rt, request, fin)
        except asyncio.CancelledError:
            fin.cancelled = True  # the server stopping while the body was read
            raise
        finally:
            self.observer.finish(rt.config.models, fin)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        rt: Runtime,
        request: ProxyRequest,
        fin: Finished,
    ) -> None:
        fin.request = request
        conn = hooks(scope)
        upstream = rt.config.upstream
        guard = Guard(
            scope,
            receive,
            self.deadlines,
            upstream.first_byte_timeout,
            upstream.stream_idle_timeout,
        )
        pipeline = rt.pipelines[self.api.name].get(request.model)
        if pipeline is None:
            pipeline = rt.unknown_model[self.api.name]
        try:
            response = await pipeline(request)
            fin.status = response.status
            if response.stream is None:
                guard.close()
                head = _head(request, response)
                await send_whole(send, conn, response.status, head, response.body)
            else:
                fin.stream_started = True
                await _send_stream(send, request, response, guard)
        except asyncio.CancelledError as exc:
            reason = guard.absorb(exc)
            fin.cancelled = reason is None or reason == "disconnect"
            if reason is None:
                raise
            if reason != "disconnect":
                await self._fail(send, conn, _cancelled_error(reason), request, fin)
        except Exception as exc:
            await self._fail(
                send, conn, _as_error(exc, "serving", request.request_id), request, fin
            )
        finally:
            guard.close()
            fin.first_byte_at = guard.first_byte_at

    async def _fail(
        self,
        send: Send,
        conn: ConnectionHooks | None,
        exc: VgateError,
        request: ProxyRequest,
        fin: Finished,
    ) -> None:
        fin.error = exc
        if fin.stream_started:
            # Headers are gone: end with an error event and no [DONE], never a clean end.
            event = error_event(exc, self.api.errors)
            await send({"type": "http.response.body", "body": event, "more_body": False})
            return
        fin.status = exc.status
        extra = [*_base(request.request_id), *_encoded(request.response_headers)]
        await send_error(send, conn, exc, self.api.errors, extra)


def _query(scope: Scope, allowed: frozenset[str]) -> str:
    """The query string the engine gets: only the parameters the family forwards."""
    raw = scope.get("query_string", b"").decode("latin-1")
    return "&".join(p for p in raw.split("&") if p and p.partition("=")[0] in allowed)


def _cancelled_error(reason: Reason) -> VgateError:
    if reason == "shutdown":
        return ShuttingDown("The server is shutting down; retry the request.")
    if reason == "first_byte_timeout":
        return UpstreamTimeout("The upstream sent nothing within the first-byte timeout.")
    return UpstreamTimeout("The upstream stream went silent beyond the idle timeout.")


def _as_error(exc: Exception, doing: str, rid: str) -> VgateError:
    """A vgate error as it is; anything else is a bug: logged with its traceback, and the
    client gets a generic 500 (or an error event on a started stream), never internals."""
    if isinstance(exc, VgateError):
        return exc
    log.exception("unexpected error %s request %s", doing, rid)
    return INTERNAL_ERROR


def _base(rid: str) -> list[Header]:
    return [(b"x-request-id", rid.encode("latin-1"))]


def _encoded(headers: dict[str, str]) -> list[Header]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def _head(request: ProxyRequest, response: ProxyResponse) -> list[Header]:
    raw = [
        (b"content-type", response.content_type.encode("latin-1")),
        (b"x-request-id", request.request_id.encode("latin-1")),
    ]
    if request.served_by:
        raw.append((b"x-vgate-upstream", request.served_by.encode("latin-1")))
    # Most answers have neither (no policy headers, no relayed ones): no loop for nothing.
    if request.response_headers:
        raw += _encoded(request.response_headers)
    if response.headers:
        raw += _encoded(response.headers)
    return raw


async def _send_stream(
    send: Send, request: ProxyRequest, response: ProxyResponse, guard: Guard
) -> None:
    assert response.stream is not None
    headers = _head(request, response)
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
