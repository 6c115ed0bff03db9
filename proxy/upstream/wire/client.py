"""The client: one pool per upstream origin (and TLS setting), httpx's names."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from proxy.upstream.wire.errors import WireConnectError
from proxy.upstream.wire.pool import Pool
from proxy.upstream.wire.response import WireRequest, WireResponse


@dataclass(frozen=True)
class Tls:
    """How to authenticate an https:// upstream: the system trust store unless `ca_file`
    names a PEM bundle; `verify = False` encrypts without checking certificate or host name."""

    ca_file: str | None = None
    verify: bool = True

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        # Plain HTTP/1.1 inside TLS: no ALPN negotiation of h2 (the parser speaks 1.1 only).
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


_SYSTEM_TLS = Tls()


class WireClient:
    """`build_request`/`send`/`aclose` (httpx's names) over one pool per upstream origin."""

    def __init__(
        self, *, max_connections: int, connect_timeout: float, keepalive_expiry: float
    ) -> None:
        self._limit = max_connections
        self._connect_timeout = connect_timeout
        self._expiry = keepalive_expiry
        self._pools: dict[tuple[str, int, Tls | None], Pool] = {}
        # (method url, tls) -> (pool, request line and host header): the forwarder sends to a
        # handful of URLs.
        self._targets: dict[tuple[str, Tls | None], tuple[Pool, str]] = {}
        self._contexts: dict[Tls, ssl.SSLContext] = {}

    def _target(self, method: str, url: str, tls: Tls | None) -> tuple[Pool, str]:
        key = (f"{method} {url}", tls)
        target = self._targets.get(key)
        if target is not None:
            return target
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WireConnectError(f"not an http:// or https:// upstream URL: {url!r}")
        secure = parts.scheme == "https"
        if secure and tls is None:
            tls = _SYSTEM_TLS
        elif not secure:
            tls = None  # TLS settings of a plain http:// upstream mean nothing (config refuses)
        port = parts.port or (443 if secure else 80)
        origin = (parts.hostname, port, tls)
        pool = self._pools.get(origin)
        if pool is None:
            context = self._context(tls) if tls is not None else None
            pool = Pool(
                parts.hostname, port, self._limit, self._connect_timeout, self._expiry, context
            )
            self._pools[origin] = pool
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        target = (pool, f"{method} {path} HTTP/1.1\r\nhost: {parts.netloc}\r\n")
        if len(self._targets) < 4096:
            self._targets[key] = target
        return target

    def _context(self, tls: Tls) -> ssl.SSLContext:
        # One context per distinct setting: building one reads the trust store (milliseconds).
        context = self._contexts.get(tls)
        if context is None:
            context = self._contexts[tls] = tls.context()
        return context

    def build_request(
        self,
        method: str,
        url: str,
        *,
        content: bytes,
        headers: dict[str, str],
        tls: Tls | None = None,
    ) -> WireRequest:
        pool, start = self._target(method, url, tls)
        fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        # One scan of all the fields: a line break in a name or value would start a header
        # (or a request) of its own. Each field ends in exactly one CRLF: anything more is one.
        if fields.count("\n") != len(headers) or fields.count("\r") != len(headers):
            raise ValueError("line break in an outbound header")
        head = f"{start}content-length: {len(content)}\r\n{fields}\r\n"
        return WireRequest(pool, head.encode("latin-1"), content)

    async def send(self, request: object) -> WireResponse:
        assert isinstance(request, WireRequest)
        return await request.pool.send(request.head, request.content)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._targets.clear()
