"""What makes two requests the same for the cache, and what a client may ask of it.

The key is a SHA-256 over the route family, the model name the client sent, the model's
identity (what its upstreams serve: a reload that points the name at other weights misses), the
API key's name unless `shared_across_keys`, and the body as the engine would get it from the
policies (truncated, clamped) with its top-level fields in sorted order. Only the top level is
sorted: key order inside a value can change the answer (a chat template writes a tool's JSON
schema into the prompt as it comes, and structured output follows a schema's property order).

Left out: `model` (the name is keyed on its own), `priority` (vLLM's scheduling order, not
the answer) and `cache_salt` (which prefix-cache entries the engine may reuse: auth sets one per
API key, and it never changes the answer; the key's name is in the key anyway unless
`shared_across_keys`). `stream` stays, normalised to a boolean: a stream is kept and replayed as the
events the client got, and a whole answer cannot be rendered into another API's events without
writing each family's event grammar (ids, indexes, typed Messages events), which vgate relays
and never writes. So a stream is answered only from a kept stream, and `stream_options` stays
too (whether the usage event is there). `user` stays: an answer must not cross end users either.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import orjson
from starlette.datastructures import Headers

from proxy.core.errors import InvalidRequest
from proxy.core.pipeline import ProxyRequest

HEADER = "x-vgate-cache"
Mode = Literal["allow", "off"]
_IGNORED = frozenset({"model", "priority", "stream", "cache_salt"})


def mode_of(headers: Headers) -> Mode | None:
    """`x-vgate-cache: allow` (this request may be kept and served though it samples) or `off`
    (never kept nor served); anything else is a 400."""
    value = headers.get(HEADER)
    if value is None:
        return None
    mode = value.strip().lower()
    if mode == "allow":
        return "allow"
    if mode == "off":
        return "off"
    raise InvalidRequest(f"The {HEADER} header must be 'allow' or 'off'.", code="invalid_header")


def key_of(request: ProxyRequest, identity: bytes, shared: bool) -> str | None:
    """The request's cache key (hex), or None when its body cannot be written back."""
    body = request.body
    canonical = {name: body[name] for name in sorted(body) if name not in _IGNORED}
    canonical["stream"] = request.stream
    try:
        text = orjson.dumps(canonical)
    except TypeError:
        return None  # nested deeper than orjson writes: the forwarder refuses it anyway
    owner = b"" if shared or request.key is None else request.key.name.encode()
    digest = hashlib.sha256()
    for part in (request.api.name.encode(), request.model.encode(), identity, owner):
        digest.update(part)
        digest.update(b"\x00")
    digest.update(text)
    return digest.hexdigest()
