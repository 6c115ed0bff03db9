"""API-key authentication: `Authorization: Bearer <key>` (or Anthropic's `x-api-key`) against
SHA-256 digests from config.

Keys are looked up by the SHA-256 digest of what the client sent, in a dict. That is safe
against timing attacks although a dict lookup is not a constant-time comparison: what the
timing could reveal is how closely the digest of the attacker's guess matches a stored digest,
and steering a digest towards a target takes a preimage attack on SHA-256. Python hashes the
digest with a per-process random SipHash key before it compares anything, which hides even
that. It is O(1) whatever the number of keys, unlike `hmac.compare_digest` over every key.

The key itself is never logged, never put in an error body or a metric label: errors say only
that the key is missing or wrong, and `request.key` carries the configured name. With
`isolate_prefix_cache` (the default) every request also gets the key's own `cache_salt`
(policies.salt), on the routes whose engine accepts one (`Api.cache_salt`).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, ClassVar

from starlette.datastructures import Headers

from policies.quotas import Limits
from policies.salt import cache_salt, client_salt, salt_key
from policies.services import Services
from proxy.core.binder import check
from proxy.core.config import Config
from proxy.core.errors import AuthenticationFailed, ModelNotFound
from proxy.core.pipeline import Handler, KeyInfo, ProxyRequest, ProxyResponse

KEY_PREFIX = "vg-"
# Names end up in logs, metrics and rate-limit storage keys: keep them plain.
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Longer than any key we issue by far; longer values are refused before hashing.
_MAX_KEY_CHARS = 256


def _name_ok(v: str) -> str | None:
    return None if NAME_PATTERN.fullmatch(v) else "must be 1-64 characters of A-Z a-z 0-9 . _ -"


def _digest_ok(v: str) -> str | None:
    if _HEX64.fullmatch(v):
        return None
    return "must be a SHA-256 digest: 64 lowercase hex characters (`vgate keys new NAME`)"


def _priority_ok(v: int) -> str | None:
    # Negated for vLLM, whose field is a signed 64-bit integer.
    return None if -(2**63) < v < 2**63 else "must be a 64-bit integer"


@dataclass(frozen=True, kw_only=True)
class KeyEntry:
    name: str = check(_name_ok)
    sha256: str = check(_digest_ok)
    models: list[str] | None = None  # None: every model
    # Higher first (the wait queue; the engine gets it as vLLM's `priority`, negated).
    priority: int = check(_priority_ok, 0)
    limits: Limits | None = None  # replaces `[policies.ratelimit] per_key` for this key


@dataclass(frozen=True, kw_only=True)
class AuthSettings:
    keys: list[KeyEntry] = field(default_factory=list)
    # Each key its own prefix cache in the engines (policies.salt).
    isolate_prefix_cache: bool = True


def new_key() -> tuple[str, str]:
    """A fresh API key and its SHA-256 digest (hex), the form the config stores."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, digest_hex(key)


def digest_hex(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class AuthPolicy:
    """401 without a known key; 404 for a model the key may not use (as if it did not exist)."""

    settings_class: ClassVar[type[Any]] = AuthSettings
    model_overrides: ClassVar[frozenset[str] | None] = frozenset()

    def __init__(self, settings: AuthSettings, model: str | None, services: Services) -> None:
        self._keys: dict[bytes, KeyInfo] = {
            bytes.fromhex(k.sha256): KeyInfo(
                k.name, frozenset(k.models) if k.models is not None else None, k.priority
            )
            for k in settings.keys
        }
        self._salt = salt_key(services.secret) if settings.isolate_prefix_cache else None
        # Most requests send no salt of their own: theirs is the key's, made once (an HMAC
        # per request was most of this policy's cost).
        self._salts = (
            {k.name: cache_salt(self._salt, k.name, None) for k in settings.keys}
            if self._salt is not None
            else {}
        )

    @classmethod
    def problems(cls, settings: AuthSettings, config: Config) -> list[str]:
        out: list[str] = []
        if not settings.keys:
            out.append("keys: is empty: every request would be refused (`vgate keys new NAME`)")
        names: set[str] = set()
        digests: set[str] = set()
        for i, k in enumerate(settings.keys):
            if k.name in names:
                out.append(f"keys[{i}].name: {k.name!r} is used by another key")
            if k.sha256 in digests:
                out.append(f"keys[{i}].sha256: the same key is configured twice")
            names.add(k.name)
            digests.add(k.sha256)
            for j, model in enumerate(k.models or []):
                if model not in config.models:
                    out.append(f"keys[{i}].models[{j}]: model {model!r} is not configured")
            if k.limits is not None:
                out += [f"keys[{i}].limits: {p}" for p in k.limits.problems()]
        return out

    def authenticate(self, headers: Headers) -> KeyInfo:
        """The caller's key, or AuthenticationFailed. Never echoes what was sent.

        The key comes as `Authorization: Bearer <key>` (OpenAI's clients) or `x-api-key: <key>`
        (Anthropic's); when both are sent, Authorization decides.
        """
        value = headers.get("authorization")
        if value:
            scheme, _, token = value.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer":
                raise AuthenticationFailed("Incorrect API key provided.")
        else:
            token = (headers.get("x-api-key") or "").strip()
            if not token:
                raise AuthenticationFailed(
                    "You didn't provide an API key. Send it as `Authorization: Bearer <key>` "
                    "(or `x-api-key: <key>`)."
                )
        if not token or len(token) > _MAX_KEY_CHARS:
            raise AuthenticationFailed("Incorrect API key provided.")
        # Header values arrive as latin-1 text; this gives back the exact bytes sent, whatever
        # they are (control characters and invalid UTF-8 included).
        key = self._keys.get(hashlib.sha256(token.encode("latin-1")).digest())
        if key is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return key

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        key = self.authenticate(request.headers)
        if key.allowed_models is not None and request.model not in key.allowed_models:
            raise ModelNotFound(
                f"The model `{request.model}` does not exist or you do not have access to it.",
                param="model",
            )
        if self._salt is not None and request.api.cache_salt:
            body = request.body
            own = client_salt(body)
            body["cache_salt"] = (
                self._salts[key.name] if own is None else cache_salt(self._salt, key.name, own)
            )
        request.key = key
        return await call_next(request)
