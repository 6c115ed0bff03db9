"""The proxy's configuration: one typed object, loaded from TOML and validated at the edge."""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.config import EngineConfig
from proxy.settings import (
    Binder,
    ConfigError,
    check,
    fraction,
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
    # Connections one client address may hold (IPv6: one /64); unset, because behind a
    # reverse proxy or load balancer every client has that one address.
    max_connections_per_client: int | None = check(
        lambda v: positive(v) if v is not None else None, None
    )
    # Unbounded `n` or message counts let one request exhaust an engine.
    max_n: int = check(positive, 16)
    max_messages: int = check(positive, 10_000)
    # A request head (line and headers) must arrive within header_timeout seconds of the
    # connection opening or of its first byte; the body within body_timeout of the head.
    header_timeout: float = check(positive, 10.0)
    body_timeout: float = check(positive, 30.0)
    # The request line and headers together; and how many header fields (431 beyond either).
    max_header_bytes: int = check(positive, 64 * 1024)
    max_headers: int = check(positive, 100)


@dataclass(frozen=True, kw_only=True)
class UpstreamConfig:
    """How the proxy talks to engines: explicit timeouts, one pooled client."""

    connect_timeout: float = check(positive, 5.0)
    # Until the response headers (non-streaming: the whole generation) or the first stream chunk.
    first_byte_timeout: float = check(positive, 600.0)
    # Longest silence between two chunks of a stream; streams have no total timeout.
    stream_idle_timeout: float = check(positive, 60.0)
    max_connections: int = check(positive, 1000)
    # A body the engine sends gzip/deflate-encoded anyway is decoded; a whole one past this
    # many decoded bytes is a 502 (a small body can decode to gigabytes).
    max_decoded_bytes: int = check(positive, 32 * 1024 * 1024)
    # Below the 5 s keep-alive of uvicorn (vLLM's server): a pooled connection must never race
    # the server closing it.
    keepalive_expiry: float = check(positive, 4.0)
    api_key: str | None = None  # the engine's key (the proxy's own, never the client's)
    health_interval: float = check(positive, 5.0)
    metrics_interval: float = check(positive, 2.0)


@dataclass(frozen=True, kw_only=True)
class AdminConfig:
    """The admin listener serving /metrics: off unless enabled, loopback unless opened."""

    enabled: bool = False
    host: str = "127.0.0.1"
    # 0 binds any free port (tests); the bound port is logged.
    port: int = check(lambda v: None if 0 <= v < 65536 else "must be a port number or 0", 9090)
    # Metrics name models, upstreams and key names: serving them beyond loopback is deliberate.
    allow_public: bool = False


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    # One info line per completion request.
    requests: bool = True


@dataclass(frozen=True, kw_only=True)
class BreakerConfig:
    """One circuit breaker per upstream: consecutive failures open it (docs: resilience)."""

    enabled: bool = True
    fail_max: int = check(positive, 5)
    reset_timeout: float = check(positive, 30.0)
    # Requests let through at once while half-open (pybreaker alone would let all through).
    half_open_max: int = check(positive, 1)


@dataclass(frozen=True, kw_only=True)
class RetryConfig:
    # Upstream attempts per request, failovers included (1: never a second attempt).
    attempts: int = check(positive, 3)
    # No retry or backoff starts later than this many seconds after the first attempt.
    deadline: float = check(positive, 30.0)
    # Per attempt, until the first byte (non-streaming: the whole answer); None: only the
    # request's upstream.first_byte_timeout applies, and a timeout is not retried.
    attempt_timeout: float | None = check(lambda v: None if v is None else positive(v), None)
    backoff_base: float = check(positive, 0.025)
    backoff_max: float = check(positive, 0.25)
    # Extra attempts are paid from a budget: `budget_min` plus `budget_ratio` per request.
    budget_ratio: float = check(non_negative, 0.2)
    budget_min: int = check(non_negative, 3)


@dataclass(frozen=True, kw_only=True)
class BackpressureConfig:
    max_inflight: int = check(positive, 256)  # per upstream
    queue_size: int = check(non_negative, 256)  # waiting requests per model
    max_queue_wait: float = check(positive, 10.0)
    # Shed new requests to an engine whose KV cache is fuller than this (None: never).
    kv_cache_threshold: float | None = check(lambda v: None if v is None else fraction(v), 0.85)
    # Keys with at least this priority are never shed for KV-cache usage.
    protected_priority: int = 1
    retry_after: int = check(positive, 1)  # seconds, in the Retry-After of a shed request


@dataclass(frozen=True, kw_only=True)
class ResilienceConfig:
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    backpressure: BackpressureConfig = field(default_factory=BackpressureConfig)
    # "prefix": the same conversation start goes to the same upstream (vLLM's prefix cache).
    affinity: Literal["none", "prefix"] = "none"
    affinity_messages: int = check(positive, 2)
    # Other models a request may fall back to, following `fallbacks` transitively.
    max_fallback_depth: int = check(non_negative, 3)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    upstreams: list[str] = check(non_empty)
    served_name: str | None = None
    policies: list[str] = field(default_factory=list)
    # Models to try, in order, when this one cannot serve (see [resilience]).
    fallbacks: list[str] = field(default_factory=list)


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
    # Imported here: policies import the proxy modules that import this one.
    from policies import validate as validate_policies

    binder.problems.extend(validate_policies(cfg))
    _check_admin(cfg, binder)
    _check_server(cfg, binder)
    _check_fallbacks(cfg, binder)
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


def fallback_chain(cfg: Config, name: str) -> list[str]:
    """`name`, then its fallbacks depth first without repeats, at most max_fallback_depth more."""
    chain = [name]
    limit = cfg.resilience.max_fallback_depth + 1

    def walk(model: str) -> None:
        for other in cfg.models[model].fallbacks:
            if len(chain) >= limit:
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
