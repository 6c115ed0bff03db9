"""The wire client's errors: the kernel's transport errors under the names it has always used.

What the wire client raises is exactly what `proxy.core.transport.upstream_errors` maps.
"""

from __future__ import annotations

from proxy.core.transport import (
    ConnectFailed,
    ConnectionClosed,
    ConnectTimedOut,
    PoolExhausted,
    ProtocolViolation,
    TransportError,
)

WireError = TransportError
WireConnectError = ConnectFailed
WireConnectTimeout = ConnectTimedOut
WireProtocolError = ProtocolViolation
WireClosed = ConnectionClosed
# Every connection the pool may open stayed busy for the connect timeout: the proxy's own
# limit (`upstream.max_connections`), not a failure of the upstream.
WirePoolFull = PoolExhausted
