"""Prefix caches of their own per API key: the `cache_salt` vgate sends to the engine.

vLLM's prefix cache is shared by every request with the same prefix, so how fast a prompt
starts tells a caller whether someone else sent that prefix recently. A request with a
`cache_salt` only reuses blocks cached under the same salt. vgate sets it from the key's name
(never the key): `HMAC(key, name)`, and with a salt of the client's own (to split its own cache
further) `HMAC(key, name NUL client_salt)`. Names hold no NUL, so no client salt can produce
another tenant's salt, and without the key nobody can compute one. The key is derived from the
server's secret (`policies.services.Services.secret`) with a label of its own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from proxy.core.errors import InvalidRequest

_LABEL = b"vgate cache_salt v1"
# What vLLM itself accepts (vllm/entrypoints/generate/base/protocol.py, 0.32): a client's salt
# is refused as vLLM would refuse it, whether or not it is then combined with the tenant's.
_MAX_CHARS = 128
_FORBIDDEN = frozenset("@/\\\x00")


def salt_key(secret: bytes) -> bytes:
    """The key salts are made with, from the server's secret."""
    return hmac.new(secret, _LABEL, hashlib.sha256).digest()


def cache_salt(key: bytes, tenant: str, client: str | None) -> str:
    """The tenant's salt (43 characters of base64url: 256 bits, as vLLM suggests)."""
    message = tenant.encode()
    if client is not None:
        message += b"\x00" + client.encode("utf-8", "surrogatepass")
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def client_salt(body: dict[str, Any]) -> str | None:
    """The client's own `cache_salt`, if it sent one; InvalidRequest if vLLM would refuse it."""
    value = body.get("cache_salt")
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not value
        or len(value) > _MAX_CHARS
        or any(c in _FORBIDDEN for c in value)
    ):
        raise InvalidRequest(
            f"'cache_salt' must be a non-empty string of at most {_MAX_CHARS} characters "
            "without '@', '/', '\\' or NUL",
            param="cache_salt",
        )
    return value
