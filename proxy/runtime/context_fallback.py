"""Context-window fallback: a request too long for its model runs again on a longer one.

Failures of an upstream (breaker open, connect error, timeout, 5xx) are handled inside the
forwarder, which walks the model's whole chain with the already-processed request. A prompt
that does not fit is different: the truncate policy raises ContextLengthExceeded *before* the
forwarder (or the forwarder turns vLLM's "maximum context length" 400 into one), so the request
must go through the fallback model's own pipeline, whose policies know that model's window.
Chains are acyclic (checked at config load) and bounded by `resilience.max_fallback_depth`.
"""

from __future__ import annotations

from typing import Any

from proxy.core.errors import (
    AuthenticationFailed,
    ContextLengthExceeded,
    ModelNotFound,
    PermissionDenied,
)
from proxy.core.pipeline import Handler, Outcome, ProxyRequest, ProxyResponse
from proxy.upstream.model import ModelRoute

# The fallback model refusing the caller says nothing about the original request.
_NOT_FOR_THIS_CALLER = (AuthenticationFailed, PermissionDenied, ModelNotFound)


class ContextFallback:
    """Wraps model `name`'s pipeline; on ContextLengthExceeded tries the longer models."""

    def __init__(
        self,
        name: str,
        targets: list[str],
        pipelines: dict[str, Handler],
        routes: dict[str, ModelRoute],
    ) -> None:
        self._name = name
        self._targets = targets
        self._pipelines = pipelines
        self._routes = routes

    async def __call__(self, request: ProxyRequest) -> ProxyResponse:
        # Policies rewrite top-level fields (messages, max_tokens, model): a shallow copy is
        # enough to start the next model from what the client sent.
        original: dict[str, Any] = dict(request.body)
        try:
            return await self._pipelines[self._name](request)
        except ContextLengthExceeded as exc:
            first = exc
        mine = self._routes[self._name].window()
        for target in self._targets:
            theirs = self._routes[target].window()
            if mine is not None and theirs is not None and theirs <= mine:
                continue  # known not to be longer: it would only fail the same way
            request.body = dict(original)
            request.model = target
            request.served_by = None
            request.usage = None
            # What the first model's stages found (its exact prompt count) is not this one's.
            request.outcome = Outcome()
            try:
                response = await self._pipelines[target](request)
            except ContextLengthExceeded:
                continue
            except _NOT_FOR_THIS_CALLER:
                break
            request.outcome.fallback = "context_length"
            return response
        raise first
