"""The cache's stages: keep good answers, and serve one when no upstream of the chain can.

`CacheStage` is the innermost stage of a cacheable family's pipeline (after every configured
policy, so `auth` has already refused a key that may not use the model, and the body is what
the engine gets). It passes the request on; a 200 that a request fixed by its parameters got is
kept (a stream once it ended with its terminal event, never a broken one). Only when the
forwarder gives up, that is every upstream of the model and of its fallbacks failed or sits
behind an open breaker (an `UpstreamError`: unreachable, timeout, 5xx, circuit open), is the
kept answer sent instead, marked `x-vgate-cache: fallback` with its age in
`x-vgate-cache-age`. A request shed by backpressure (engines busy, not failing), refused, or
whose stream broke after its first byte is never answered from the cache.

`CacheHeader` runs first of all stages: a bad `x-vgate-cache` value is refused before any policy
charges or counts anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from proxy.core.config import CacheConfig
from proxy.core.errors import UpstreamError
from proxy.core.pipeline import Handler, ProxyRequest, ProxyResponse
from proxy.runtime.cache.entry import Entry, Store, StoreUnavailable
from proxy.runtime.cache.key import HEADER, key_of, mode_of

log = logging.getLogger("vgate.cache")


class ResponseCache:
    """One runtime's store, and what every model's stage shares: settings, warnings."""

    def __init__(self, settings: CacheConfig, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._last_warning = 0.0

    async def lookup(self, key: str) -> Entry | None:
        try:
            return await self.store.get(key)
        except StoreUnavailable as exc:
            self._warn(exc)
            return None

    async def keep(self, key: str, entry: Entry) -> bool:
        if entry.size > self.settings.max_entry_bytes:
            return False
        try:
            await self.store.put(key, entry)
        except StoreUnavailable as exc:
            self._warn(exc)
            return False
        return True

    def _warn(self, exc: StoreUnavailable) -> None:
        now = time.monotonic()
        if now - self._last_warning > 30.0:  # one line per outage, not one per request
            self._last_warning = now
            log.warning("response cache storage unavailable: %s", exc)


class CacheHeader:
    """Refuses a bad `x-vgate-cache` value before anything else runs."""

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        mode_of(request.headers)
        return await call_next(request)


class CacheStage:
    """Keeps and serves one model's answers (`identity`: what its upstreams serve)."""

    def __init__(self, cache: ResponseCache, identity: bytes) -> None:
        self._cache = cache
        self._identity = identity
        self._shared = cache.settings.shared_across_keys
        self._any = not cache.settings.deterministic_only

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        mode = mode_of(request.headers)
        if mode == "off" or (
            mode is None and not self._any and not request.api.deterministic(request.body)
        ):
            return await call_next(request)
        # Before the forwarder: it writes the upstream's model name and stream options into
        # the body.
        key = key_of(request, self._identity, self._shared)
        if key is None:
            return await call_next(request)
        try:
            response = await call_next(request)
        except UpstreamError:
            entry = await self._cache.lookup(key)
            if entry is None or entry.stream != request.stream:
                request.outcome.cache = "miss"
                raise
            return _answer(request, entry)
        if response.status == 200:
            if response.stream is None:
                entry = _entry(request, response, response.body, stream=False)
                if await self._cache.keep(key, entry):
                    request.outcome.cache = "stored"
            else:
                response.stream = self._keep_stream(response.stream, response, request, key)
        return response

    async def _keep_stream(
        self,
        stream: AsyncIterator[bytes],
        response: ProxyResponse,
        request: ProxyRequest,
        key: str,
    ) -> AsyncIterator[bytes]:
        limit = self._cache.settings.max_entry_bytes
        parts: list[bytes] | None = []
        size = 0
        try:
            async for chunk in stream:
                if parts is not None:
                    size += len(chunk)
                    if size <= limit:
                        parts.append(chunk)
                    else:
                        parts = None  # too large to keep: stop holding it
                yield chunk
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        # Reached only when the relay ended cleanly: it raises on a stream cut short (no
        # terminal event), and a client that leaves closes this generator at its `yield`.
        if parts is not None:
            entry = _entry(request, response, b"".join(parts), stream=True)
            if await self._cache.keep(key, entry):
                request.outcome.cache = "stored"


def _entry(request: ProxyRequest, response: ProxyResponse, body: bytes, *, stream: bool) -> Entry:
    return Entry(
        content_type=response.content_type,
        body=body,
        stream=stream,
        headers=dict(response.headers),
        usage=request.usage,
        made_at=time.time(),
    )


def _answer(request: ProxyRequest, entry: Entry) -> ProxyResponse:
    """The kept answer, as the client got it then; its usage counts as this request's."""
    request.usage = entry.usage
    request.served_by = None
    request.outcome.cache = "fallback"
    request.response_headers[HEADER] = "fallback"
    request.response_headers["x-vgate-cache-age"] = str(max(0, int(time.time() - entry.made_at)))
    if entry.stream:
        return ProxyResponse(
            200, entry.content_type, stream=_replay(entry.body), headers=dict(entry.headers)
        )
    return ProxyResponse(200, entry.content_type, body=entry.body, headers=dict(entry.headers))


async def _replay(body: bytes) -> AsyncIterator[bytes]:
    yield body
