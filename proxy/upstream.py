"""The engine-facing HTTP clients, and the one boundary that translates their transport errors.

The hot path (completions) uses `proxy.wire.WireClient`: the subset of httpx's API the
forwarder needs, on vgate's own HTTP/1.1 pool (why: proxy/wire.py). Anything that speaks the
same subset (`httpx.AsyncClient` itself, e.g. over a respx router in unit tests) can take its
place.

The control plane (health probes, metrics scrapes, /tokenize) is not hot and uses httpx.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import httpx

from proxy.config import UpstreamConfig
from proxy.errors import (
    Overloaded,
    UpstreamError,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.wire import WireClient, WireConnectError, WireConnectTimeout, WireError, WirePoolFull


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


class upstream_errors:
    """Translate transport errors (httpx's and proxy.wire's) into vgate errors, in one place.

    `started` says whether response bytes already reached the client: then any failure is a
    broken stream, whatever its cause. A full connection pool is the proxy's own limit, not
    the upstream's failure: `Overloaded` (503, Retry-After), not an `UpstreamError`. A class
    rather than @contextmanager: it is entered several times per request on the hot path, and
    a generator per entry costs more.
    """

    __slots__ = ("_started", "_target")

    def __init__(self, target: str, *, started: bool = False) -> None:
        self._target = target
        self._started = started

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None or not isinstance(exc, TimeoutError | httpx.TransportError | WireError):
            return
        target = self._target
        if isinstance(exc, WirePoolFull | httpx.PoolTimeout):
            raise Overloaded(
                f"All connections to upstream {target} are busy; retry shortly.",
                headers={"retry-after": "1"},
            ) from exc
        if self._started:
            raise UpstreamStreamBroken("The upstream connection failed mid-response.") from exc
        if isinstance(exc, httpx.ConnectTimeout | WireConnectTimeout):
            raise UpstreamUnreachable(f"Upstream {target} did not accept a connection.") from exc
        if isinstance(exc, httpx.TimeoutException | asyncio.TimeoutError):
            raise UpstreamTimeout(f"Upstream {target} timed out.") from exc
        if isinstance(exc, httpx.ConnectError | WireConnectError):
            raise UpstreamUnreachable(f"Upstream {target} is unreachable.") from exc
        raise UpstreamError(f"Upstream {target} failed: {type(exc).__name__}.") from exc
