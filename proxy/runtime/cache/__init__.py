"""The response cache: answers kept to serve when every upstream of a model's chain has failed.

`[cache]` in the config (proxy.core.config.CacheConfig). An exact-match cache of successful
answers to requests whose parameters fix the answer (proxy.core.api.Api.deterministic), or that
opt in with `x-vgate-cache: allow`: `key` says what makes two requests the same, `stage` when an
answer is kept and when one is served, `memory` and `redis_store` where answers live.
"""

from __future__ import annotations

from proxy.core.config import ENGINE_PREFIX, CacheConfig, Config
from proxy.runtime.cache.entry import Entry, Stats, Store
from proxy.runtime.cache.memory import MemoryStore
from proxy.runtime.cache.stage import CacheHeader, CacheStage, ResponseCache
from proxy.upstream.model import ModelRoute

__all__ = [
    "CacheHeader",
    "CacheStage",
    "Entry",
    "MemoryStore",
    "ResponseCache",
    "Stats",
    "Store",
    "build",
    "identity",
]


def build(settings: CacheConfig) -> ResponseCache:
    """The cache `[cache]` describes, with its store (Redis only when configured)."""
    if settings.storage == "memory":
        store: Store = MemoryStore(
            max_entries=settings.max_entries, max_bytes=settings.max_bytes, ttl=settings.ttl
        )
    else:
        from proxy.runtime.cache.redis_store import RedisStore  # redis is an optional dependency

        store = RedisStore(
            settings.storage,
            prefix=settings.key_prefix,
            max_entries=settings.max_entries,
            max_bytes=settings.max_bytes,
            ttl=settings.ttl,
            timeout=settings.storage_timeout,
        )
    return ResponseCache(settings, store)


def identity(config: Config, route: ModelRoute) -> bytes:
    """What a model's upstreams serve: their served names, and the weights an engine vgate
    launches was given (a pinned `NAME@sha256:` digest changes with its content)."""
    parts = set()
    for upstream in route.upstreams:
        label = upstream.label
        engine = (
            config.engines.get(label[len(ENGINE_PREFIX) :])
            if label.startswith(ENGINE_PREFIX)
            else None
        )
        parts.add(f"{upstream.served_name}\x00{engine.model if engine is not None else ''}")
    return "\x01".join(sorted(parts)).encode()
