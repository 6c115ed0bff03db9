"""The request pipeline: what a policy sees, what it returns, and how policies are chained.

A policy is one small class with one async method, `__call__(request, call_next)`, composed
around the forwarding handler the way Starlette composes middleware: it can rewrite or reject the
request before `call_next`, and inspect or wrap the response after it. Streams stay raw bytes; a
policy that needs events wraps `response.stream` itself (see `proxy.upstream.sse`), so no event is
parsed
unless some policy asks for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.datastructures import Headers


class RequestHeaders(Headers):
    """Starlette's Headers with a `get` that does not raise for a missing header.

    `Mapping.get` goes through `__getitem__` and catches its KeyError: for headers most
    requests lack (x-request-id, content-length of a chunked body) that exception was ~3% of a
    proxied request's CPU (py-spy, bench/).
    """

    def get(self, key: str, default: Any = None) -> Any:
        wanted = key.lower().encode("latin-1")
        for name, value in self.raw:
            if name == wanted:
                return value.decode("latin-1")
        return default


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """The authenticated caller: a name safe for logs and metrics, never the key itself."""

    name: str
    allowed_models: frozenset[str] | None = None
    priority: int = 0


@dataclass(slots=True)
class ProxyRequest:
    route: str  # "chat/completions" | "completions"
    model: str  # the name the client sent
    body: dict[str, Any]  # parsed JSON; policies may rewrite it
    headers: Headers  # the client's headers (read-only)
    request_id: str
    stream: bool
    key: KeyInfo | None = None
    # Extra headers the client gets on success and on error (x-vgate-*, x-ratelimit-*).
    response_headers: dict[str, str] = field(default_factory=dict)
    # Set by the forwarding layer: which upstream and model served the request.
    served_by: str | None = None
    # The upstream's usage object (streams included: the proxy always asks for it).
    usage: dict[str, Any] | None = None
    # What policies did, for the request's log line and metrics ("truncated": 3, ...).
    outcome: dict[str, Any] = field(default_factory=dict)

    @property
    def max_tokens(self) -> int | None:
        value = self.body.get("max_completion_tokens", self.body.get("max_tokens"))
        return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(slots=True)
class ProxyResponse:
    """An upstream answer: a whole body, or a stream of raw upstream bytes."""

    status: int
    content_type: str
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[ProxyRequest], Awaitable[ProxyResponse]]


class Policy(Protocol):
    """One step of the pipeline. Raise a `proxy.core.errors.VgateError` to reject."""

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse: ...


def chain(policies: Sequence[Policy], endpoint: Handler) -> Handler:
    """Compose policies around `endpoint`; the first policy runs first."""
    handler = endpoint
    for policy in reversed(policies):
        handler = _bind(policy, handler)
    return handler


def _bind(policy: Policy, call_next: Handler) -> Handler:
    async def step(request: ProxyRequest) -> ProxyResponse:
        return await policy(request, call_next)

    return step
