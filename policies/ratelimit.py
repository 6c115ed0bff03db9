"""Requests and tokens per minute, per key, per model and overall, in memory or in Redis.

Before forwarding, one atomic charge takes a request from every request budget that applies and
reserves `prompt estimate + max_tokens` from every token budget. After the answer, the
reservation is reconciled with the upstream's real `usage` (for streams when the stream ends,
also when it breaks or the client leaves); without usage the reservation stands. A refused
request consumes nothing and gets 429 with `Retry-After` and the `x-ratelimit-*` headers; every
answer carries those headers too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from policies.auth import AuthSettings
from policies.buckets import Bucket, Charge, Decision, MemoryStorage, Storage
from policies.buckets import StorageUnavailable as StorageUnavailable
from policies.quotas import Limits
from policies.services import Services
from policies.shm_storage import SharedFileStorage
from proxy.core.binder import Binder, check, positive
from proxy.core.config import Config
from proxy.core.errors import RateLimited, VgateError
from proxy.core.pipeline import Handler, KeyInfo, ProxyRequest, ProxyResponse

log = logging.getLogger("vgate.ratelimit")


def _storage_ok(v: str) -> str | None:
    if v == "memory" or v.startswith(("redis://", "rediss://", "unix://")):
        return None
    return "must be 'memory' or a redis:// (rediss://, unix://) URL"


@dataclass(frozen=True, kw_only=True)
class RateLimitSettings:
    storage: str = check(_storage_ok, "memory")
    overall: Limits | None = None  # one budget for all traffic of this proxy (or Redis)
    per_model: Limits | None = None  # each model its own budget
    per_key: Limits | None = None  # each API key its own budget (a key's `limits` replace it)
    # Reserved for the completion when the request sets no max_tokens (reconciled afterwards).
    default_max_tokens: int = check(positive, 256)
    key_prefix: str = "vgate:rl"  # Redis key namespace (several deployments on one Redis)
    # Storage unreachable: serve without limits (and log) rather than refuse everything.
    fail_open: bool = True
    storage_timeout: float = check(positive, 0.25)


class RateLimitPolicy:
    settings_class: ClassVar[type[Any]] = RateLimitSettings
    model_overrides: ClassVar[frozenset[str] | None] = frozenset(
        {"per_model", "default_max_tokens"}
    )

    def __init__(self, settings: RateLimitSettings, model: str | None, services: Services) -> None:
        self._settings = settings
        self._storage = _shared_storage(settings, services)
        prefix = settings.key_prefix
        fixed: list[Bucket] = []
        for limits, scope in ((settings.overall, "all"), (settings.per_model, f"model:{model}")):
            # An unknown model (model None) gets no bucket of its own: its name is client input.
            if limits is not None and (scope == "all" or model is not None):
                fixed += [b for b in limits.buckets(f"{prefix}:{scope}") if b is not None]
        self._fixed = fixed
        self._default_key = settings.per_key
        self._key_limits = _key_limits(services.config)
        self._plans: dict[str | None, tuple[list[Bucket], list[Bucket]]] = {}
        self._last_warning = 0.0

    @classmethod
    def problems(cls, settings: RateLimitSettings, config: Config) -> list[str]:
        out: list[str] = []
        for name in ("overall", "per_model", "per_key"):
            limits = getattr(settings, name)
            if limits is not None:
                out += [f"{name}.{p}" for p in limits.problems()]
        return out

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        buckets, tokens = self._buckets(request.key)
        if not buckets:
            return await call_next(request)
        reserved = 0
        if tokens:
            prompt = request.outcome.prompt_tokens or request.api.prompt_estimate(request.body)
            # Only a route that generates holds an output budget (an embedding's is its prompt).
            output = request.max_tokens or self._settings.default_max_tokens
            reserved = prompt + (output if request.api.generates else 0)
        charges: list[Charge] = [(b, reserved if b.tokens else 1) for b in buckets]
        decision = await self._charge(charges)
        if decision is None:  # storage down, failing open
            return await call_next(request)
        headers = _headers(charges, decision.used)
        if not decision.allowed:
            never = any(cost > b.capacity for b, cost in charges)
            short = [
                b
                for (b, cost), u in zip(charges, decision.used, strict=True)
                if b.remaining(u) < cost
            ]
            request.outcome.rate_limited = "tokens" if any(b.tokens for b in short) else "requests"
            raise RateLimited(
                _message(charges, decision, never), headers=_refusal(headers, decision, never)
            )
        request.response_headers.update(headers)
        if not tokens:
            return await call_next(request)
        try:
            response = await call_next(request)
        except VgateError:
            # Refused or failed before generating: give the reservation back.
            await self._settle(tokens, reserved, 0)
            raise
        if response.stream is None:
            used = _used(request) if response.status < 400 else 0
            await self._settle(tokens, reserved, used)
        else:
            response.stream = self._reconcile_at_end(response.stream, request, tokens, reserved)
        return response

    def _buckets(self, key: KeyInfo | None) -> tuple[list[Bucket], list[Bucket]]:
        """(every bucket that applies, the token buckets among them)."""
        name = key.name if key is not None else None
        cached = self._plans.get(name)
        if cached is None:
            limits = self._key_limits.get(name, self._default_key) if name else None
            own = limits.buckets(f"{self._settings.key_prefix}:key:{name}") if limits else ()
            every = [b for b in own if b is not None] + self._fixed
            # Key names come from config, so this cache is bounded.
            cached = self._plans[name] = (every, [b for b in every if b.tokens])
        return cached

    async def _reconcile_at_end(
        self,
        stream: AsyncIterator[bytes],
        request: ProxyRequest,
        tokens: list[Bucket],
        reserved: int,
    ) -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
            # Usage arrives as the last event; a broken or abandoned stream has none, and the
            # reservation stands (the engine may have generated up to max_tokens).
            await self._settle(tokens, reserved, _used(request))

    async def _settle(self, tokens: list[Bucket], reserved: int, used: int | None) -> None:
        """Correct the reservation to the real usage; never raises (the answer is out)."""
        if used is None or used == reserved:
            return
        try:
            await self._storage.adjust(tokens, used - reserved)
        except StorageUnavailable as exc:
            self._warn(exc)

    async def _charge(self, charges: Sequence[Charge], *, force: bool = False) -> Decision | None:
        try:
            return await self._storage.charge(charges, force=force)
        except StorageUnavailable as exc:
            if not self._settings.fail_open:
                raise RateLimited(
                    "Rate limits cannot be checked right now; retry shortly.",
                    headers={"retry-after": "1"},
                ) from None
            self._warn(exc)
            return None

    def _warn(self, exc: StorageUnavailable) -> None:
        now = time.monotonic()
        if now - self._last_warning > 30.0:  # one line per outage, not one per request
            self._last_warning = now
            log.warning("rate-limit storage unavailable, limits not enforced: %s", exc)


def _used(request: ProxyRequest) -> int | None:
    return request.usage.total_tokens if request.usage is not None else None


def _shared_storage(settings: RateLimitSettings, services: Services) -> Storage:
    """One storage per runtime and URL: every model's pipeline must charge the same buckets."""
    name = f"ratelimit:{settings.storage}"
    storage = services.shared.get(name)
    if not isinstance(storage, Storage):
        box = services.box
        if settings.storage == "memory" and box is not None and box.count > 1:
            # One limit for the box across its workers, with no service to run.
            storage = SharedFileStorage(box.ratelimit_file)
        elif settings.storage == "memory":
            storage = MemoryStorage()
        else:
            from policies.redis_storage import RedisStorage  # redis is an optional dependency

            storage = RedisStorage(settings.storage, timeout=settings.storage_timeout)
        services.shared[name] = storage
    return storage


def _key_limits(config: Config) -> dict[str, Limits]:
    binder = Binder()
    auth = binder.bind(AuthSettings, config.policies.get("auth", {}), "policies.auth")
    if auth is None:
        return {}
    return {k.name: k.limits for k in auth.keys if k.limits is not None}


def _headers(charges: Sequence[Charge], used: Sequence[float]) -> dict[str, str]:
    """x-ratelimit-* for requests and tokens: the tightest bucket of each kind speaks."""
    # Runs on every request: one pass, no intermediate containers.
    req_left = tok_left = -1
    req_ahead = tok_ahead = 0.0
    req_bucket = tok_bucket = None
    for (bucket, _), ahead in zip(charges, used, strict=True):
        left = bucket.remaining(ahead)
        if bucket.tokens:
            if tok_bucket is None or left < tok_left or (left == tok_left and ahead > tok_ahead):
                tok_left, tok_ahead, tok_bucket = left, ahead, bucket
        elif req_bucket is None or left < req_left or (left == req_left and ahead > req_ahead):
            req_left, req_ahead, req_bucket = left, ahead, bucket
    out: dict[str, str] = {}
    if req_bucket is not None:
        out["x-ratelimit-limit-requests"] = req_bucket.limit_text
        out["x-ratelimit-remaining-requests"] = str(req_left)
        out["x-ratelimit-reset-requests"] = duration(req_ahead)
    if tok_bucket is not None:
        out["x-ratelimit-limit-tokens"] = tok_bucket.limit_text
        out["x-ratelimit-remaining-tokens"] = str(tok_left)
        out["x-ratelimit-reset-tokens"] = duration(tok_ahead)
    return out


def _refusal(headers: dict[str, str], decision: Decision, never: bool) -> dict[str, str]:
    out = dict(headers)
    if never:
        out["x-should-retry"] = "false"
    else:
        out["retry-after"] = str(max(1, math.ceil(decision.retry_after)))
        out["retry-after-ms"] = str(max(1, math.ceil(decision.retry_after * 1000)))
    return out


def _message(charges: Sequence[Charge], decision: Decision, never: bool) -> str:
    if never:
        cost = max(c for b, c in charges if b.tokens)
        cap = min(math.floor(b.capacity) for b, c in charges if c > b.capacity)
        return (
            f"This request needs {cost} tokens (prompt estimate + max_tokens), more than the "
            f"whole budget of {cap} tokens: it can never be served. Lower max_tokens."
        )
    return f"Rate limit reached. Retry after {duration(decision.retry_after)}."


def duration(seconds: float) -> str:
    """OpenAI's reset format: `120ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`."""
    ms = math.ceil(seconds * 1000 - 1e-6)
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms / 1000:.3f}".rstrip("0") + "s"
    if minutes >= 60:
        return f"{minutes // 60}h{minutes % 60}m{secs}"
    return f"{minutes}m{secs}" if minutes else secs
