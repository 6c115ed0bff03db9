"""The engine-facing HTTP clients, and the one boundary that translates their transport errors.

The hot path (completions) uses `FastClient`: the subset of httpx's API the forwarder needs,
on aiohttp's connection pool. Measured on one core at 16 concurrent requests, the client side
alone cost ~300 us CPU per request on aiohttp and ~1,000 us through httpx's models on the same
aiohttp pool (bench/README.md): httpx's Request/URL/Headers objects, not the transport, dominate.
Anything that speaks the same subset (`httpx.AsyncClient` itself, e.g. over a respx router in
unit tests, or `upstream.client = "httpx"`) can take its place.

The control plane (health probes, metrics scrapes, /tokenize) is not hot and uses httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Protocol

import aiohttp
import httpx

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamError, UpstreamStreamBroken, UpstreamTimeout, UpstreamUnreachable

_RAW_BODY_MAX = 1024 * 1024  # aiohttp.payload.TOO_LARGE_BYTES_BODY


class UpstreamResponse(Protocol):
    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    async def aread(self) -> bytes: ...
    def aiter_raw(self) -> AsyncIterator[bytes]: ...
    async def aclose(self) -> None: ...


class UpstreamClient(Protocol):
    """What the forwarder needs of an HTTP client: httpx's names, nothing more."""

    # The request object is opaque: whatever build_request made, send takes back.
    def build_request(
        self, method: str, url: str, *, content: bytes, headers: dict[str, str]
    ) -> Any: ...
    async def send(self, request: Any, *, stream: bool = ...) -> UpstreamResponse: ...
    async def aclose(self) -> None: ...


class _Outbound:
    __slots__ = ("content", "headers", "method", "url")

    def __init__(self, method: str, url: str, content: bytes, headers: dict[str, str]) -> None:
        self.method = method
        self.url = url
        self.content = content
        self.headers = headers


class _FastResponse:
    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def status_code(self) -> int:
        return self._response.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    async def aread(self) -> bytes:
        return await self._response.read()

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        # iter_any: whatever arrived, as soon as it arrived (no fixed chunk size to fill).
        async for chunk in self._response.content.iter_any():
            yield chunk

    async def aclose(self) -> None:
        # An unfinished response closes its connection instead of returning it to the pool:
        # that close is what makes vLLM abort the generation.
        self._response.release()


class FastClient:
    """httpx's `build_request`/`send`/`aclose` on one aiohttp session."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self._cfg = cfg
        self._session: aiohttp.ClientSession | None = None
        # Read timeouts are ours (first byte, stream idle: proxy.guard); only connecting and
        # waiting for a pooled connection are bounded here.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=cfg.connect_timeout, sock_connect=cfg.connect_timeout
        )

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._cfg.max_connections,
            keepalive_timeout=self._cfg.keepalive_expiry,
        )
        # No cookie jar: cookies from one client's upstream answer must never reach another's.
        # No env proxies: the outbound host is only ever a configured upstream. No automatic
        # headers: only the headers the forwarder chooses leave.
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            timeout=self._timeout,
        )
        return self._session

    def build_request(
        self, method: str, url: str, *, content: bytes, headers: dict[str, str]
    ) -> _Outbound:
        return _Outbound(method, url, content, headers)

    async def send(self, request: object, *, stream: bool = True) -> _FastResponse:
        assert isinstance(request, _Outbound)
        session = self._session or self._open()
        content = request.content
        response = await session.request(
            request.method,
            request.url,
            # aiohttp warns (ResourceWarning) on raw bytes over 1 MiB: an error under -W error
            # and the test suite. A file-like body is sent in pieces, with its Content-Length.
            data=content if len(content) <= _RAW_BODY_MAX else io.BytesIO(content),
            headers=request.headers,
            allow_redirects=False,
        )
        return _FastResponse(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def make_client(
    cfg: UpstreamConfig, transport: httpx.AsyncBaseTransport | None = None
) -> UpstreamClient:
    """The hot-path client; an injected httpx transport (tests) selects httpx instead."""
    if transport is None:
        return FastClient(cfg)
    return make_control_client(cfg, transport)


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


@contextlib.contextmanager
def upstream_errors(target: str, *, started: bool = False) -> Iterator[None]:
    """Translate transport errors (httpx's and aiohttp's) into vgate errors, in one place.

    `started` says whether response bytes already reached the client: then any failure is a
    broken stream, whatever its cause.
    """
    try:
        yield
    except (TimeoutError, httpx.TransportError, aiohttp.ClientError) as exc:
        if started:
            raise UpstreamStreamBroken("The upstream connection failed mid-response.") from exc
        if isinstance(
            exc,
            httpx.ConnectTimeout | httpx.PoolTimeout | aiohttp.ConnectionTimeoutError,
        ):
            raise UpstreamUnreachable(f"Upstream {target} did not accept a connection.") from exc
        if isinstance(exc, httpx.TimeoutException | asyncio.TimeoutError):
            raise UpstreamTimeout(f"Upstream {target} timed out.") from exc
        if isinstance(exc, httpx.ConnectError | aiohttp.ClientConnectorError):
            raise UpstreamUnreachable(f"Upstream {target} is unreachable.") from exc
        raise UpstreamError(f"Upstream {target} failed: {type(exc).__name__}.") from exc
