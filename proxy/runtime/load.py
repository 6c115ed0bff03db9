"""Loading a config: the schema (proxy.core.config), then every check that needs another layer.

Every command that reads a config file goes through here (`serve`, `check-config`, `up`, reload,
`engine args|run`), so a file that one of them accepts the others accept too, and every problem
is reported at once: schema, policies, attempt modules, and the bind rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import policies
from proxy.core import config as schema
from proxy.core.binder import ConfigError
from proxy.core.config import Config, is_loopback
from proxy.upstream import registry


def load(path: str | Path) -> Config:
    """Read and validate a TOML config file; raises ConfigError listing every problem."""
    return from_dict(schema.read(path), str(path))


def from_dict(data: dict[str, Any], source: str = "<memory>") -> Config:
    cfg, problems = schema.parse(data, source)
    if cfg is not None:
        problems = [*problems, *check(cfg)]
    if problems or cfg is None:
        raise ConfigError(source, problems)
    return cfg


def check(cfg: Config) -> list[str]:
    """The problems a config's schema cannot see."""
    return [*policies.validate(cfg), *registry.problems(cfg), *bind_problems(cfg)]


def has_auth(cfg: Config) -> bool:
    """Whether every request is authenticated (the auth policy runs for every model)."""
    order = cfg.policies.get("order", [])
    return isinstance(order, list) and "auth" in order


def bind_problems(cfg: Config) -> list[str]:
    """A public listener without authentication must be a deliberate choice."""
    host = cfg.server.host
    if is_loopback(host) or has_auth(cfg) or cfg.server.allow_unauthenticated:
        return []
    return [
        f"server.host: {host!r} is not a loopback address and no authentication is "
        "configured; add the auth policy or set server.allow_unauthenticated = true"
    ]
