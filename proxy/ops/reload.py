"""Config reload (SIGHUP / `systemctl reload`): a new Runtime swapped in whole, or nothing.

Requests in flight keep the Runtime they started with (they captured it); new requests get the
new one. A config that does not load, validate or build is refused and the old one keeps
serving. Settings that only a restart can apply (the listener, the connection pool) are logged.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from proxy.core.binder import ConfigError
from proxy.core.config import Config
from proxy.runtime import load
from proxy.runtime.holder import RuntimeHolder
from proxy.runtime.runtime import Runtime

log = logging.getLogger("vgate.reload")

# Read once when the listener or the pooled client is built: a reload cannot change them.
RESTART_ONLY = {
    "server": (
        "host",
        "port",
        "workers",
        "keepalive_timeout",
        "max_concurrency",
        "max_connections_per_client",
        "header_timeout",
        "body_timeout",
        "max_header_bytes",
        "max_headers",
    ),
    "upstream": ("connect_timeout", "max_connections", "keepalive_expiry"),
    # The admin listener and the log handlers are built at start too.
    "admin": ("enabled", "host", "port"),
    "logging": ("level", "format"),
}


@dataclass
class Outcome:
    applied: bool
    problems: list[str] = field(default_factory=list)
    needs_restart: list[str] = field(default_factory=list)


def needs_restart(old: Config, new: Config) -> list[str]:
    """Changed keys that take effect only after a restart, as "section.key"."""
    changed = []
    for section, keys in RESTART_ONLY.items():
        before, after = getattr(old, section), getattr(new, section)
        changed += [f"{section}.{k}" for k in keys if getattr(before, k) != getattr(after, k)]
    return changed


class Reloader:
    """Reloads the config file at `path` into `holder`; one reload at a time."""

    def __init__(self, holder: RuntimeHolder, path: str) -> None:
        self.holder = holder
        self.path = path  # loaded through proxy.runtime.load: the checks `serve` applies
        self._lock = asyncio.Lock()

    async def reload(self) -> Outcome:
        async with self._lock:
            return await self._reload()

    async def _reload(self) -> Outcome:
        old = self.holder()
        try:
            new_config = load.load(self.path)
            runtime = Runtime(
                new_config, old.client, old.upstream_client, old.apis, old.id_secret, old.box
            )
        except ConfigError as exc:
            log.error(
                "reload refused, the running config is kept: %s: %s",
                exc.source,
                "; ".join(exc.problems),
            )
            return Outcome(False, problems=list(exc.problems))
        except Exception as exc:  # a policy that fails to build must not take the proxy down
            log.error("reload refused, the running config is kept: %s: %r", self.path, exc)
            return Outcome(False, problems=[repr(exc)])
        runtime.inherit(old)
        await runtime.start()
        self.holder.set(runtime)
        await old.stop()
        restart = needs_restart(old.config, new_config)
        if restart:
            log.warning(
                "reload applied; changed settings that need a restart: %s", ", ".join(restart)
            )
        log.info("reload applied from %s (%d models)", self.path, len(new_config.models))
        return Outcome(True, needs_restart=restart)
