"""The request pipeline: what a policy sees, what it returns, and how policies are chained.

A policy is one small class with one async method, `__call__(request, call_next)`, composed
around the forwarding handler the way Starlette composes middleware: it can rewrite or reject the
request before `call_next`, and inspect or wrap the response after it. Streams stay raw bytes; a
policy that needs events wraps `response.stream` itself, so no event is parsed unless some policy
asks for it.

What stages did travels in typed records: `Outcome` (named fields, plus `extra` for third-party
stages) and `Usage` (the engine's token counts, whatever the route's own usage shape).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.datastructures import Headers

from proxy.core.api import Api, StreamState, Usage

__all__ = [
    "Handler",
    "KeyInfo",
    "Outcome",
    "Policy",
    "ProxyRequest",
    "ProxyResponse",
    "RequestHeaders",
    "Usage",
    "chain",
]


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


# Values a stage may report in `Outcome.extra`: names and numbers only (they reach logs).
Reported = str | int | float | bool | None


class Outcome:
    """What the stages of one request did, for its log line and metrics.

    Each field has one writer; readers never depend on the order stages ran in beyond what the
    field says. Third-party policies report with `report(name, value)` (written on the log
    line). The defaults live on the class: a request's record holds only what some stage wrote,
    so making one costs nothing on the hot path.
    """

    rate_limited: str | None = None  # ratelimit: which limit refused ("requests" | "tokens")
    shed: str | None = None  # admission: why it was refused ("queue_full", "kv_cache", ...)
    retries: int = 0  # forwarder: extra upstream attempts before the first byte
    fallback: str | None = None  # forwarder/fallback: why it left its model ("timeout", ...)
    breaker: str | None = None  # forwarder: "open" when every upstream's breaker refused
    queue_wait: float | None = None  # admission: seconds waited for an upstream slot
    prompt_tokens: int | None = None  # truncate: the exact prompt count (ratelimit reserves it)
    truncated: int = 0  # truncate: messages dropped to fit the window
    tokenize_calls: int = 0  # truncate: /tokenize calls made
    max_tokens_clamped: int | None = None  # truncate: the lowered max_tokens
    truncate: str | None = None  # truncate: "not_counted" when /tokenize failed
    # cache: "fallback" (answered from it), "miss" (it had no answer), "stored" (kept)
    cache: str | None = None
    routed: str | None = None  # route: why it left the model asked for ("tools", "header", ...)
    routed_to: str | None = None  # route: the model it went to instead
    extra: dict[str, Reported] | None = None  # what `report` was given

    def report(self, name: str, value: Reported) -> None:
        """A third-party stage's own finding (a short name or a number), for the log line."""
        if self.extra is None:
            self.extra = {}
        self.extra[name] = value

    def reported(self) -> dict[str, Reported]:
        """The fields that say something (not at their default), then `extra`."""
        out: dict[str, Reported] = {
            name: value for name, value in vars(self).items() if name != "extra" and value
        }
        for name, value in (self.extra or {}).items():
            out.setdefault(name, value)
        return out


@dataclass(slots=True)
class ProxyRequest:
    api: Api  # the route family: its name, body shape, usage shape, stream framing
    model: str  # the name the client sent
    body: dict[str, Any]  # parsed JSON; policies may rewrite it
    headers: Headers  # the client's headers (read-only)
    request_id: str
    stream: bool
    key: KeyInfo | None = None
    # Path parameters of the route (`{"id": ...}` for /v1/responses/{id}).
    params: Mapping[str, str] = field(default_factory=dict)
    # Extra headers the client gets on success and on error (x-vgate-*, x-ratelimit-*).
    response_headers: dict[str, str] = field(default_factory=dict)
    # Set by the forwarding layer: which upstream and model served the request.
    served_by: str | None = None
    # Only this upstream (its label) may serve: it holds what the request refers to (a stored
    # response). Set by a stage; the forwarder then neither balances nor falls back.
    pin: str | None = None
    # The query string passed to the engine (only the parameters the family forwards).
    query: str = ""
    # The engine's token counts (streams included: the proxy always asks for them).
    usage: Usage | None = None
    outcome: Outcome = field(default_factory=Outcome)

    @property
    def route(self) -> str:
        """The route family's name ("chat/completions", ...): the metrics label."""
        return self.api.name

    @property
    def max_tokens(self) -> int | None:
        return self.api.max_tokens(self.body)


@dataclass(slots=True)
class ProxyResponse:
    """An upstream answer: a whole body, or a stream of raw upstream bytes."""

    status: int
    content_type: str
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # A stream's state, before its first block is relayed (a stage may set `rewrite`).
    state: StreamState | None = None


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
