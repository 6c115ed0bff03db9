"""The engine-facing HTTP clients (their transport errors are mapped in proxy.core.transport).

The hot path uses `proxy.upstream.wire.WireClient`: the subset of httpx's API the forwarder
needs, on vgate's own HTTP/1.1 pool (why: proxy/upstream/wire.py). An injected httpx transport
(unit tests over a respx router or a MockTransport) selects real httpx instead, behind the same
`UpstreamClient` protocol.

The control plane (health probes, metrics scrapes, /tokenize) is not hot and uses httpx.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import httpx

from proxy.core.config import UpstreamConfig
from proxy.upstream.wire import Tls, WireClient


class UpstreamResponse(Protocol):
    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def content_type(self) -> str: ...
    @property
    def content_encoding(self) -> str | None: ...
    async def aread(self) -> bytes: ...
    def aiter_raw(self) -> AsyncIterator[bytes]: ...
    async def aclose(self) -> None: ...


class UpstreamClient(Protocol):
    """What the forwarder needs of an HTTP client: httpx's names, nothing more."""

    # The request object is opaque: whatever build_request made, send takes back.
    def build_request(
        self,
        method: str,
        url: str,
        *,
        content: bytes,
        headers: dict[str, str],
        tls: Tls | None = None,
    ) -> object: ...
    async def send(self, request: object) -> UpstreamResponse: ...
    async def aclose(self) -> None: ...


class HttpxUpstream:
    """httpx behind `UpstreamClient`, for tests that inject a transport (no TLS of its own:
    the transport decides what a URL reaches)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    def build_request(
        self,
        method: str,
        url: str,
        *,
        content: bytes,
        headers: dict[str, str],
        tls: Tls | None = None,
    ) -> httpx.Request:
        return self._client.build_request(method, url, content=content, headers=headers)

    async def send(self, request: object) -> _HttpxResponse:
        assert isinstance(request, httpx.Request)
        return _HttpxResponse(await self._client.send(request, stream=True))

    async def aclose(self) -> None:
        await self._client.aclose()


class _HttpxResponse:
    """An httpx response behind `UpstreamResponse` (httpx has no `content_type` of its own)."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    @property
    def status_code(self) -> int:
        return self._response.status_code

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    @property
    def content_type(self) -> str:
        return str(self._response.headers.get("content-type", "application/json"))

    @property
    def content_encoding(self) -> str | None:
        value = self._response.headers.get("content-encoding")
        return None if value is None else str(value)

    async def aread(self) -> bytes:
        return await self._response.aread()

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return self._response.aiter_raw()

    async def aclose(self) -> None:
        await self._response.aclose()


def make_client(
    cfg: UpstreamConfig, transport: httpx.AsyncBaseTransport | None = None
) -> UpstreamClient:
    """The hot-path client; an injected httpx transport (tests) selects httpx instead."""
    if transport is None:
        return WireClient(
            max_connections=cfg.max_connections,
            connect_timeout=cfg.connect_timeout,
            keepalive_expiry=cfg.keepalive_expiry,
        )
    return HttpxUpstream(make_control_client(cfg, transport))


def make_control_client(
    cfg: UpstreamConfig, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The client for probes, scrapes and /tokenize; created and closed in the lifespan."""
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(
            connect=cfg.connect_timeout, read=None, write=None, pool=cfg.connect_timeout
        ),
        limits=httpx.Limits(keepalive_expiry=cfg.keepalive_expiry),
        follow_redirects=False,
        trust_env=False,
    )
