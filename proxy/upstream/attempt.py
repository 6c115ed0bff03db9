"""One upstream attempt: the HTTP exchange, the stream's first-chunk peek, and its relay.

A stream is handed back only once its first chunk arrived, so a failure before the first event
can still be retried (proxy.upstream.forward) and the client sees one coherent stream. After
that, bytes are relayed as they arrive, cut only at event boundaries; the route family sees each
block of whole events (usage, terminator). A stream that ends without the family's terminal
event was cut short, however the transport ended: it fails like a reset. The attempt's `Lease`
(its slot on the upstream and its breaker probe) is released when the stream ends, however.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from proxy.core.api import StreamState
from proxy.core.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    UpstreamServerError,
    UpstreamStreamBroken,
)
from proxy.core.pipeline import ProxyRequest, ProxyResponse
from proxy.core.transport import upstream_errors
from proxy.upstream.client import UpstreamClient, UpstreamResponse
from proxy.upstream.encoding import coding_of, decode_stream, decode_whole
from proxy.upstream.model import ModelRoute, Upstream
from proxy.upstream.sse import Framer

# What vLLM says when a prompt does not fit its window (renderers/params.py, input_processor.py).
_OVERFLOW_MARKS = (b"maximum context length", b"maximum model length")
# proxy.http.guard cancels the request task with its reason: these are the upstream's fault.
_TIMEOUT_REASONS = ("first_byte_timeout", "idle_timeout")


def timed_out(exc: asyncio.CancelledError) -> bool:
    """Whether a cancellation is the guard's first-byte or idle timeout (not the client)."""
    return bool(exc.args) and exc.args[0] in _TIMEOUT_REASONS


class Lease:
    """One attempt's hold on an upstream: its slot and, while half-open, its probe."""

    __slots__ = ("probe", "released", "route", "started", "upstream")

    def __init__(self, route: ModelRoute, upstream: Upstream, probe: bool) -> None:
        self.route = route
        self.upstream = upstream
        self.probe = probe
        self.released = False
        self.started = time.monotonic()

    def succeeded(self) -> None:
        # Called when `Sender.send` returns: for a stream at its first chunk (time to first
        # token), otherwise once the whole answer is read. `started` is taken after the slot
        # and the breaker admitted the call, so time queued in the proxy is not the upstream's.
        self.upstream.breaker.success(self.probe, time.monotonic() - self.started)
        self.probe = False

    def failed(self) -> None:
        self.upstream.failures += 1
        self.upstream.breaker.failure(self.probe)
        self.probe = False

    def abandoned(self) -> None:
        self.upstream.breaker.release(self.probe)
        self.probe = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.route.admission.release(self.upstream)


def _priority(body: dict[str, Any], priority: int | None, upstream: Upstream) -> None:
    """A key's priority is the only one its requests carry (a client's own would jump the
    engine's queue), and only to an engine scheduling by it on a route that takes the field
    (`priority` None otherwise): vLLM runs lower values first and vgate's keys higher first,
    hence the sign. Per attempt: a retry may reach another engine."""
    if priority is not None and upstream.priority_scheduling:
        body["priority"] = -priority
    else:
        body.pop("priority", None)


class Sender:
    """Sends one request to one upstream with only the headers we choose; relays only bodies
    it can read (an encoded one is decoded or refused: proxy.upstream.encoding)."""

    def __init__(
        self, client: UpstreamClient, max_event_bytes: int, max_decoded: int = 32 * 1024 * 1024
    ) -> None:
        self._client = client
        self._max_event = max_event_bytes
        self._max_decoded = max_decoded

    async def send(
        self, request: ProxyRequest, lease: Lease, state: StreamState, overflow: bool
    ) -> ProxyResponse:
        """POST the request to the lease's upstream; a stream returns once its first chunk came."""
        upstream = lease.upstream
        api = request.api
        # Only headers we choose leave: never the client's Authorization, cookies, hop-by-hop
        # or custom-host headers; the URL is the configured upstream, whatever the body says.
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream" if request.stream else "application/json",
            "accept-encoding": "identity",
            "x-request-id": request.request_id,
        }
        if upstream.auth:
            headers["authorization"] = upstream.auth
        path = api.upstream_path.format_map(request.params) if request.params else api.upstream_path
        url = upstream.base_url + path
        if request.query:
            url = f"{url}?{request.query}"
        if api.by_id:
            content = b""  # the id in the path says it all
            del headers["content-type"]
        else:
            body = request.body
            body["model"] = upstream.served_name
            if request.key is not None:
                _priority(body, request.key.priority if api.priority else None, upstream)
            try:
                content = orjson.dumps(body)
            except TypeError:
                # orjson reads 1024 levels of nesting but writes only 254: a 400, not a 500.
                raise InvalidRequest("Request body is nested too deeply.") from None
        outbound = self._client.build_request(
            api.method, url, content=content, headers=headers, tls=upstream.tls
        )
        label = upstream.label
        with upstream_errors(label):
            response = await self._client.send(outbound)
        status = response.status_code
        try:
            with upstream_errors(label):
                coding = coding_of(response.content_encoding)
            if request.stream and status < 400:
                chunks = response.aiter_raw()
                if coding is not None:
                    chunks = decode_stream(chunks, coding)
                with upstream_errors(label):
                    first = await anext(chunks, b"")
                if not first:
                    raise UpstreamServerError("The upstream ended the stream before any event.")
                api.peek(first, state)
                relay = _relay(first, chunks, response, lease, request, state, self._max_event)
                return ProxyResponse(
                    status=status,
                    content_type="text/event-stream; charset=utf-8",
                    stream=_Stream(relay, response, lease),
                    state=state,
                )
            with upstream_errors(label):
                if coding is None:
                    content = await response.aread()
                else:
                    content = await decode_whole(response.aiter_raw(), coding, self._max_decoded)
        except BaseException:
            await response.aclose()
            raise
        await response.aclose()
        if status >= 500:
            # 5xx bodies can carry tracebacks and paths: the client gets a generic message.
            raise UpstreamServerError(
                f"The upstream failed to process the request (status {status})."
            )
        if status < 300:
            request.usage = api.usage(content)
        elif status == 400 and overflow and any(m in content for m in _OVERFLOW_MARKS):
            raise ContextLengthExceeded(
                "The prompt is longer than this model's context window.", param=api.prompt_field
            )
        relayed = _relayed(response, api.relay_headers) if api.relay_headers else {}
        return ProxyResponse(
            status=status, content_type=response.content_type, body=content, headers=relayed
        )


class _Stream:
    """The client-facing stream: iterating it iterates the relay directly (no extra layer per
    chunk); closing it always frees the upstream, even if iteration never started."""

    __slots__ = ("_lease", "_relay", "_response")

    def __init__(
        self, relay: AsyncIterator[bytes], response: UpstreamResponse, lease: Lease
    ) -> None:
        self._relay = relay
        self._response = response
        self._lease = lease

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._relay

    async def __anext__(self) -> bytes:
        return await anext(self._relay)

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._relay, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            if not self._lease.released:
                # The relay never started (the client left before the headers went out).
                self._lease.abandoned()
                self._lease.release()
                await self._response.aclose()

    def __del__(self) -> None:
        # Last resort if a wrapper never closed us: the slot must not leak (the connection is
        # reclaimed by the client library's own finalizer).
        if not self._lease.released:
            self._lease.release()


def _renamed(block: bytes, rewrite: list[tuple[bytes, bytes]]) -> bytes:
    for old, new in rewrite:
        block = block.replace(old, new)
    return block


def _relayed(response: UpstreamResponse, names: tuple[str, ...]) -> dict[str, str]:
    """The response headers a family relays (besides content-type), where present."""
    headers = response.headers
    return {name: value for name in names if (value := headers.get(name)) is not None}


async def _relay(
    first: bytes,
    chunks: AsyncIterator[bytes],
    response: UpstreamResponse,
    lease: Lease,
    request: ProxyRequest,
    state: StreamState,
    max_event: int,
) -> AsyncIterator[bytes]:
    """The upstream's bytes as they arrive, in whole events; usage lands in `request.usage`."""
    inspect = request.api.inspect
    framer = Framer(max_event)
    try:
        block = framer.feed(first)
        if block and (block := inspect(block, state)):
            yield _renamed(block, state.rewrite) if state.rewrite else block
        with upstream_errors(lease.upstream.label, started=True):
            async for chunk in chunks:
                block = framer.feed(chunk)
                if block and (block := inspect(block, state)):
                    yield _renamed(block, state.rewrite) if state.rewrite else block
        rest = framer.rest()
        if rest:
            yield rest  # an unfinished last event: relayed as it came
        if not state.finished:
            raise UpstreamStreamBroken("The upstream ended the stream before its final event.")
    except UpstreamStreamBroken:
        lease.failed()
        raise
    except asyncio.CancelledError as exc:
        if timed_out(exc):
            lease.failed()
        raise
    finally:
        # Policies further out read it when the stream ends, however it ends.
        if state.usage is not None:
            request.usage = state.usage
        await response.aclose()
        lease.release()
