"""The sd_notify protocol, raw: one datagram of `KEY=value` lines to $NOTIFY_SOCKET.

No library is needed (the protocol is a unix datagram) and none is wanted in the proxy's venv.
Outside systemd (no $NOTIFY_SOCKET) every call is a cheap no-op, so the server calls it always.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("vgate.systemd")


def _address(value: str | None) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace socket: a leading NUL instead of the '@'.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other forms: not used by a local service manager


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC), or None when no watchdog is asked of us."""
    usec = environ.get("WATCHDOG_USEC")
    owner = environ.get("WATCHDOG_PID")
    if not usec or (owner and owner != str(pid)):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class Notifier:
    """Tells the service manager about readiness, reloads, shutdown and liveness."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET"))
        self.watchdog_interval = watchdog_interval(env, os.getpid())
        self._sock: socket.socket | None = None
        self._warned = False

    def notify(self, *fields: str) -> bool:
        """Send `fields` (e.g. "READY=1", "STATUS=...") in one datagram; False if not delivered."""
        if self._address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            # The manager's socket is best effort (as in libsystemd): never fail the service.
            if not self._warned:
                self._warned = True
                log.warning("sd_notify to %r failed: %s", self._address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload it asked for.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self, status: str, extend_timeout: float | None = None) -> bool:
        fields = ["STOPPING=1", f"STATUS={status}"]
        if extend_timeout is not None:
            # Draining may take longer than TimeoutStopSec=: ask for what the config allows.
            fields.append(f"EXTEND_TIMEOUT_USEC={int(extend_timeout * 1e6)}")
        return self.notify(*fields)

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
