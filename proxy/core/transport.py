"""Transport failures, and the one boundary that turns them into vgate errors.

Every HTTP client vgate uses to reach an engine raises either httpx's transport errors (the
control plane: probes, scrapes, /tokenize) or the ones below (the hot path's own client,
`proxy.upstream.wire`, which raises these very classes). `upstream_errors` is the only place
either becomes a `VgateError`, so a connect timeout means the same thing on every path.
"""

from __future__ import annotations

import asyncio

import httpx

from proxy.core.errors import (
    Overloaded,
    UpstreamError,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnreachable,
)


class TransportError(Exception):
    """A connection to an upstream failed."""


class ConnectFailed(TransportError):
    """Connecting failed: refused, unreachable, unknown host."""


class ConnectTimedOut(TransportError):
    """No connection within the connect timeout (connecting, or waiting for a pool slot)."""


class ProtocolViolation(TransportError):
    """The upstream sent something that is not an HTTP/1.1 response."""


class ConnectionClosed(TransportError):
    """The connection ended before the response did."""


class PoolExhausted(TransportError):
    """Every connection the proxy may open to the upstream stayed busy: the proxy's own limit,
    not the upstream's failure."""


class upstream_errors:
    """Translate transport errors (httpx's and ours) into vgate errors, in one place.

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
        if exc is None or not isinstance(exc, TimeoutError | httpx.TransportError | TransportError):
            return
        target = self._target
        if isinstance(exc, PoolExhausted | httpx.PoolTimeout):
            raise Overloaded(
                f"All connections to upstream {target} are busy; retry shortly.",
                headers={"retry-after": "1"},
            ) from exc
        if self._started:
            raise UpstreamStreamBroken("The upstream connection failed mid-response.") from exc
        if isinstance(exc, httpx.ConnectTimeout | ConnectTimedOut):
            raise UpstreamUnreachable(f"Upstream {target} did not accept a connection.") from exc
        if isinstance(exc, httpx.TimeoutException | asyncio.TimeoutError):
            raise UpstreamTimeout(f"Upstream {target} timed out.") from exc
        if isinstance(exc, httpx.ConnectError | ConnectFailed):
            raise UpstreamUnreachable(f"Upstream {target} is unreachable.") from exc
        raise UpstreamError(f"Upstream {target} failed: {type(exc).__name__}.") from exc
