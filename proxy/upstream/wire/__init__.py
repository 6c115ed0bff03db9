"""vgate's HTTP/1.1 client for the hot path: a keep-alive pool of asyncio protocols, httptools.

Why our own: on one core at 16 concurrent requests, aiohttp's client machinery (request and
response models, payload writers, stream readers, timers, tracing hooks) was a third of the
proxy's CPU per request (py-spy, bench/README.md); httpx's own pool costs several times more.
A proxy to a known engine needs a small subset of HTTP/1.1: POST with a Content-Length body, a
response framed by Content-Length, chunked encoding or EOF, keep-alive. The parsing is
httptools (llhttp, the parser uvicorn serves with); this module only moves bytes and state.

A connection goes back to the pool only if its bytes were exactly one response to the request
it carried: anything after that response's end (a byte in the same read, a byte while idle) or
an answer that came while the request was still being written retires it.

It speaks the httpx subset of `proxy.upstream.client.UpstreamClient`, so respx-driven tests can
put a real `httpx.AsyncClient` in its place.
"""

from proxy.upstream.wire.client import Tls, WireClient
from proxy.upstream.wire.conn import Conn as _Conn
from proxy.upstream.wire.errors import (
    WireClosed,
    WireConnectError,
    WireConnectTimeout,
    WireError,
    WirePoolFull,
    WireProtocolError,
)
from proxy.upstream.wire.pool import Pool as _Pool
from proxy.upstream.wire.response import WireRequest, WireResponse

__all__ = [
    "Tls",
    "WireClient",
    "WireClosed",
    "WireConnectError",
    "WireConnectTimeout",
    "WireError",
    "WirePoolFull",
    "WireProtocolError",
    "WireRequest",
    "WireResponse",
    "_Conn",
    "_Pool",
]
