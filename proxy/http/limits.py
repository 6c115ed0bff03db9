"""What the connections of one listener share for its limits: `server.max_concurrency` and
`server.max_connections_per_client`.

`proxy.protocol` checks the concurrency limit as each request's head completes. uvicorn's own
count of requests is its set of request tasks, and a task leaves it one loop iteration after it
ends (a done callback), after its response went out: a keep-alive client's next request, or
another client's, could find the answered one still counted. Requests whose response is
complete are therefore subtracted.

Connections per client are counted by IP address, IPv6 addresses by their /64 (the prefix one
host or subscriber is given: it can pick any address in it), an IPv4-mapped IPv6 address as its
IPv4 address. A connection over the limit is not counted, here or in `max_concurrency`.
"""

from __future__ import annotations

import asyncio
import ipaddress


def client_key(host: str) -> str:
    """The address a client's connections are counted under."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])  # without an IPv6 zone (%eth0)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Listener:
    """State shared by the connections of one listener (one per `protocol_class`)."""

    __slots__ = ("_answered", "_clients", "per_client")

    def __init__(self, per_client: int | None = None) -> None:
        # Request tasks whose response is complete; each leaves when its task ends.
        self._answered: set[asyncio.Task[None]] = set()
        self.per_client = per_client
        self._clients: dict[str, int] = {}  # key -> connections counted

    def join(self, host: str) -> str | None:
        """Count a new connection from `host`: its key, or None if it is over the limit."""
        key = client_key(host)
        count = self._clients.get(key, 0)
        if self.per_client is not None and count >= self.per_client:
            return None
        self._clients[key] = count + 1
        return key

    def leave(self, key: str) -> None:
        """A counted connection closed."""
        count = self._clients.pop(key, 0) - 1
        if count > 0:
            self._clients[key] = count

    def requests(self, tasks: set[asyncio.Task[None]]) -> int:
        """Requests in flight: uvicorn's request tasks less those already answered."""
        return len(tasks) - len(self._answered)

    def answered(self) -> None:
        """Called inside a request task as its response completes."""
        task = asyncio.current_task()
        if task is not None and task not in self._answered:
            self._answered.add(task)
            task.add_done_callback(self._answered.discard)
