"""The sections of the config file, one frozen dataclass each (bound by proxy.core.binder)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.core.binder import (
    check,
    fraction,
    non_empty,
    non_negative,
    port_number,
    positive,
)
from proxy.core.box import cores


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
    # Processes accepting on the one port (SO_REUSEPORT) under one supervisor; "auto": one per
    # core this process may use. Limits such as max_concurrency then apply per worker.
    workers: int | Literal["auto"] = check(
        lambda v: None if v == "auto" or 1 <= v <= 256 else 'must be 1-256 or "auto"', 1
    )
    # Signs the response ids clients see (proxy.runtime.response_ids): set the same secret on
    # every proxy behind one load balancer; unset, a random one per process.
    response_id_secret: str | None = check(
        lambda v: None if v is None or len(v) >= 16 else "must be at least 16 characters", None
    )
    # Connections one client address may hold (IPv6: one /64); unset, because behind a
    # reverse proxy or load balancer every client has that one address.
    max_connections_per_client: int | None = check(
        lambda v: positive(v) if v is not None else None, None
    )
    # Unbounded `n` or message counts let one request exhaust an engine.
    max_n: int = check(positive, 16)
    max_messages: int = check(positive, 10_000)
    # A completions batch (a list of prompts), and prompts x n: what one request may multiply.
    max_prompts: int = check(positive, 256)
    max_sequences: int = check(positive, 1024)
    # Any other list a route reads (content parts, tools, stop, embedding inputs, documents).
    max_items: int = check(positive, 2048)
    # A request head (line and headers) must arrive within header_timeout seconds of the
    # connection opening or of its first byte; the body within body_timeout of the head.
    header_timeout: float = check(positive, 10.0)
    body_timeout: float = check(positive, 30.0)
    # The request line and headers together; and how many header fields (431 beyond either).
    max_header_bytes: int = check(positive, 64 * 1024)
    max_headers: int = check(positive, 100)

    def worker_count(self) -> int:
        return cores() if self.workers == "auto" else self.workers


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
    # The most one stream may hold of an unfinished event: a larger one ends the stream with
    # an error event and closes the engine request (an event is normally a token or two).
    max_event_bytes: int = check(positive, 4 * 1024 * 1024)


@dataclass(frozen=True, kw_only=True)
class AdminConfig:
    """The admin listener serving /metrics: off unless enabled, loopback unless opened."""

    enabled: bool = False
    host: str = "127.0.0.1"
    # 0 binds any free port (tests); the bound port is logged. Not 9090: that is Prometheus's own
    # port, and the scraper usually runs on the same host (the listener is loopback-only).
    port: int = check(lambda v: None if 0 <= v < 65536 else "must be a port number or 0", 9464)
    # Metrics name models, upstreams and key names: serving them beyond loopback is deliberate.
    allow_public: bool = False


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    # One info line per completion request.
    requests: bool = True


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
    """Attempt-level modules: which ones (registry names) and their settings tables.

    `breaker` and `retry` are bound by the runtime to the settings class of the module their
    `kind` names (proxy.upstream.modules), as policies' tables are: a new module brings its own
    keys without touching this schema.
    """

    breaker: dict[str, Any] = field(default_factory=dict)
    retry: dict[str, Any] = field(default_factory=dict)
    balancer: str = "least_outstanding"
    fallback: str = "ordered"
    backpressure: BackpressureConfig = field(default_factory=BackpressureConfig)
    # "prefix": the same conversation start goes to the same upstream (vLLM's prefix cache).
    affinity: Literal["none", "prefix"] = "none"
    affinity_messages: int = check(positive, 2)
    # Other models a request may fall back to, following `fallbacks` transitively.
    max_fallback_depth: int = check(non_negative, 3)


def _storage_url(v: str) -> str | None:
    """`memory`, or a Redis URL (what the rate limiter and the response cache accept)."""
    if v == "memory" or v.startswith(("redis://", "rediss://", "unix://")):
        return None
    return "must be 'memory' or a redis:// (rediss://, unix://) URL"


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """`[cache]`: answers kept to serve when every upstream of a model's chain has failed."""

    enabled: bool = False
    storage: str = check(_storage_url, "memory")
    max_entries: int = check(positive, 10_000)
    max_bytes: int = check(positive, 64 * 1024 * 1024)  # of all answers kept
    max_entry_bytes: int = check(positive, 1024 * 1024)  # a larger answer is not kept
    ttl: float = check(positive, 3600.0)  # seconds an answer may be served after it was made
    # False: an answer is served only to the API key it was made for (tenants stay apart).
    shared_across_keys: bool = False
    # False: any request may be kept and served, not only those fixed by their parameters.
    deterministic_only: bool = True
    key_prefix: str = check(non_empty, "vgate:cache")  # Redis key namespace
    storage_timeout: float = check(positive, 0.25)  # seconds for one Redis round trip


@dataclass(frozen=True, kw_only=True)
class UpstreamEntry:
    """One upstream written as a table: its URL (or engine:NAME) and how to reach it."""

    url: str
    # Overrides [upstream] api_key (and an engine's own key) for this upstream.
    api_key: str | None = None
    # https:// only: a CA bundle (PEM) trusted instead of the system store, and whether to
    # verify the certificate and host name at all (false: encrypted but unauthenticated).
    ca_file: str | None = None
    verify: bool = True
    # A URL upstream's engine schedules like this (vgate cannot see it; an engine:NAME
    # upstream's is its engine's `scheduling_policy`): "priority" sends keys' priorities.
    scheduling_policy: Literal["fcfs", "priority"] | None = None


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    # Base URLs or engine:NAME, or tables (UpstreamEntry) where one needs TLS settings or a key.
    upstreams: list[str | UpstreamEntry] = check(non_empty)
    served_name: str | None = None
    policies: list[str] = field(default_factory=list)
    # Models to try, in order, when this one cannot serve (see [resilience]).
    fallbacks: list[str] = field(default_factory=list)
