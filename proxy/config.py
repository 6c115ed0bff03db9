"""The proxy's configuration: one typed object, loaded from TOML and validated at the edge."""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from proxy.settings import (
    Binder,
    ConfigError,
    check,
    non_empty,
    non_negative,
    port_number,
    positive,
)

ENGINE_PREFIX = "engine:"


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = check(port_number, 8080)
    # Binding a non-loopback address without auth must be a deliberate choice.
    allow_unauthenticated: bool = False
    max_body_bytes: int = check(positive, 4 * 1024 * 1024)
    keepalive_timeout: float = check(positive, 5.0)
    # Seconds SIGTERM waits for open streams before cancelling them upstream.
    drain_timeout: float = check(non_negative, 30.0)
    max_concurrency: int | None = check(lambda v: positive(v) if v is not None else None, None)
    # Unbounded `n` or message counts let one request exhaust an engine.
    max_n: int = check(positive, 16)
    max_messages: int = check(positive, 10_000)


@dataclass(frozen=True, kw_only=True)
class UpstreamConfig:
    """How the proxy talks to engines: explicit timeouts, one pooled client."""

    connect_timeout: float = check(positive, 5.0)
    # Until the response headers (non-streaming: the whole generation) or the first stream chunk.
    first_byte_timeout: float = check(positive, 600.0)
    # Longest silence between two chunks of a stream; streams have no total timeout.
    stream_idle_timeout: float = check(positive, 60.0)
    max_connections: int = check(positive, 1000)
    # Below the 5 s keep-alive of uvicorn (vLLM's server): a pooled connection must never race
    # the server closing it.
    keepalive_expiry: float = check(positive, 4.0)
    api_key: str | None = None  # the engine's key (the proxy's own, never the client's)
    health_interval: float = check(positive, 5.0)
    metrics_interval: float = check(positive, 2.0)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    upstreams: list[str] = check(non_empty)
    served_name: str | None = None
    policies: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    models: dict[str, ModelConfig] = check(non_empty)
    engines: dict[str, EngineConfig] = field(default_factory=dict)
    policies: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"


def load(path: str | Path) -> Config:
    """Read and validate a TOML config file; raises ConfigError listing every problem."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    return from_dict(data, source)


def from_dict(data: dict[str, Any], source: str = "<memory>") -> Config:
    binder = Binder()
    data = {**data, "source": source}
    cfg = binder.bind(Config, data)
    if cfg is not None:
        _cross_checks(cfg, binder)
    if binder.problems or cfg is None:
        raise ConfigError(source, binder.problems)
    return cfg


def _cross_checks(cfg: Config, binder: Binder) -> None:
    for name, model in cfg.models.items():
        for i, up in enumerate(model.upstreams):
            key = f"models.{name}.upstreams[{i}]"
            if up.startswith(ENGINE_PREFIX):
                if up[len(ENGINE_PREFIX) :] not in cfg.engines:
                    binder.problem(
                        key, f"names engine {up[len(ENGINE_PREFIX) :]!r}, not configured"
                    )
            elif not up.startswith(("http://", "https://")):
                binder.problem(key, f"must be an http(s) base URL or engine:NAME, got {up!r}")
            elif up.rstrip("/").endswith("/v1"):
                binder.problem(key, "is a base URL without /v1 (the proxy adds the path)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
