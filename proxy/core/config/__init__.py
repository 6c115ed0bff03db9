"""The proxy's configuration: one typed object, read from TOML and checked at the edge.

This is the schema and what can be checked from the file alone (types, unknown keys, names that
must exist, fallback cycles). What needs other layers (policy settings, attempt modules, engine
files) is checked by `proxy.runtime.load`, which every command loads a config through.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.core.binder import Binder, ConfigError, check, non_empty
from proxy.core.config.distributed import check_engines
from proxy.core.config.engines import EngineConfig
from proxy.core.config.sections import (
    AdminConfig,
    BackpressureConfig,
    CacheConfig,
    LoggingConfig,
    ModelConfig,
    ResilienceConfig,
    ServerConfig,
    UpstreamConfig,
    UpstreamEntry,
)

__all__ = [
    "ENGINE_PREFIX",
    "AdminConfig",
    "BackpressureConfig",
    "CacheConfig",
    "Config",
    "ConfigError",
    "EngineConfig",
    "LoggingConfig",
    "ModelConfig",
    "ResilienceConfig",
    "ServerConfig",
    "UpstreamConfig",
    "UpstreamEntry",
    "entries",
    "fallback_chain",
    "is_loopback",
    "parse",
    "read",
]

ENGINE_PREFIX = "engine:"


@dataclass(frozen=True, kw_only=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    models: dict[str, ModelConfig] = check(non_empty)
    engines: dict[str, EngineConfig] = field(default_factory=dict)
    policies: dict[str, Any] = field(default_factory=dict)
    admin: AdminConfig = field(default_factory=AdminConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    source: str = "<memory>"


def read(path: str | Path) -> dict[str, Any]:
    """The TOML data of a config file; ConfigError if it cannot be read or parsed."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None


def parse(data: dict[str, Any], source: str = "<memory>") -> tuple[Config | None, list[str]]:
    """Bind `data` to the schema; returns the config (None if it cannot be built) and every
    problem found, so callers can add their own before raising them all at once."""
    binder = Binder()
    cfg = binder.bind(Config, {**data, "source": source})
    if cfg is not None:
        _check_upstreams(cfg, binder)
        _check_admin(cfg, binder)
        _check_server(cfg, binder)
        _check_fallbacks(cfg, binder)
        _check_cache(cfg, binder)
        check_engines(cfg.engines, binder)
    return cfg, binder.problems


def entries(model: ModelConfig) -> list[UpstreamEntry]:
    """The model's upstreams, each as a table (a plain string is a table with only `url`)."""
    return [u if isinstance(u, UpstreamEntry) else UpstreamEntry(url=u) for u in model.upstreams]


def _check_upstreams(cfg: Config, binder: Binder) -> None:
    for name, model in cfg.models.items():
        for i, entry in enumerate(entries(model)):
            key = f"models.{name}.upstreams[{i}]"
            url = entry.url
            if url.startswith(ENGINE_PREFIX):
                engine = url[len(ENGINE_PREFIX) :]
                if engine not in cfg.engines:
                    binder.problem(key, f"names engine {engine!r}, not configured")
                elif cfg.engines[engine].headless:
                    binder.problem(
                        key, f"names engine {engine!r}, a headless worker node (no API server)"
                    )
                if entry.scheduling_policy is not None:
                    binder.problem(
                        f"{key}.scheduling_policy",
                        f"is the engine's own: set engines.{engine}.scheduling_policy",
                    )
            elif not url.startswith(("http://", "https://")):
                binder.problem(key, f"must be an http(s) base URL or engine:NAME, got {url!r}")
            elif url.rstrip("/").endswith("/v1"):
                binder.problem(key, "is a base URL without /v1 (the proxy adds the path)")
            if (entry.ca_file is not None or not entry.verify) and not url.startswith("https://"):
                binder.problem(key, "ca_file and verify apply to https:// upstreams only")
            if entry.ca_file is not None and not Path(entry.ca_file).is_file():
                binder.problem(f"{key}.ca_file", f"{entry.ca_file!r} is not a readable file")


def _check_admin(cfg: Config, binder: Binder) -> None:
    admin = cfg.admin
    if not admin.enabled:
        return
    if not is_loopback(admin.host) and not admin.allow_public:
        binder.problem(
            "admin.host",
            f"{admin.host!r} is not a loopback address and /metrics has no authentication; "
            "scrape over loopback or set admin.allow_public = true",
        )
    if admin.port == cfg.server.port:
        binder.problem("admin.port", f"{admin.port} is the main listener's port")


def _check_server(cfg: Config, binder: Binder) -> None:
    server = cfg.server
    per_client, total = server.max_connections_per_client, server.max_concurrency
    if per_client is not None and total is not None and per_client > total:
        binder.problem(
            "server.max_connections_per_client",
            f"{per_client} is more than server.max_concurrency ({total}): it would never apply",
        )


def _check_cache(cfg: Config, binder: Binder) -> None:
    cache = cfg.cache
    if cache.max_entry_bytes > cache.max_bytes:
        binder.problem(
            "cache.max_entry_bytes",
            f"{cache.max_entry_bytes} is more than cache.max_bytes ({cache.max_bytes}): "
            "no answer that size could be kept",
        )


def _check_fallbacks(cfg: Config, binder: Binder) -> None:
    for name, model in cfg.models.items():
        for i, other in enumerate(model.fallbacks):
            if other == name or other not in cfg.models:
                what = "the model itself" if other == name else "not a configured model"
                binder.problem(f"models.{name}.fallbacks[{i}]", f"{other!r} is {what}")
    # A fallback chain that loops sends one failure around forever (seen in other gateways).
    for name in cfg.models:
        cycle = _find_cycle(cfg, name, [name])
        if cycle is not None and cycle[0] == name:
            binder.problem(f"models.{name}.fallbacks", f"cycle: {' -> '.join(cycle)}")


def _find_cycle(cfg: Config, name: str, path: list[str]) -> list[str] | None:
    for other in cfg.models[name].fallbacks:
        if other not in cfg.models:
            continue
        if other in path:
            return [*path[path.index(other) :], other]
        found = _find_cycle(cfg, other, [*path, other])
        if found is not None:
            return found
    return None


def fallback_chain(cfg: Config, name: str, depth: int) -> list[str]:
    """`name`, then its fallbacks depth first without repeats, at most `depth` more."""
    chain = [name]

    def walk(model: str) -> None:
        for other in cfg.models[model].fallbacks:
            if len(chain) > depth:
                return
            if other not in chain:
                chain.append(other)
                walk(other)

    walk(name)
    return chain


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
