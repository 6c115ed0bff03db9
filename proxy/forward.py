"""The pipeline's endpoint: choose an upstream, send, retry or fail over, hand back the answer.

Per request: walk the model's chain (its own upstreams, then its fallback models) for the least
busy upstream whose breaker admits a call; take a slot on it (or wait, bounded: proxy.admission);
send. A transport error, timeout or 5xx before the first byte reaches the client is counted by
that upstream's breaker and, while attempts, the deadline and the shared retry budget allow, the
request moves to another upstream (or backs off and retries the same one). Once a byte has gone
to the client nothing is retried: a failure then ends the stream with an error event.

One attempt (the HTTP exchange, the stream peek and relay) is proxy.attempt; the choice of
upstream is proxy.balance; slots and queueing proxy.admission; the breaker proxy.breaker.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from engine.monitor import EngineMonitor
from proxy.admission import Admission
from proxy.attempt import Lease, Sender, timed_out
from proxy.balance import Choice, affinity_key, choose, pick
from proxy.breaker import Breaker
from proxy.config import ResilienceConfig
from proxy.errors import (
    CircuitOpen,
    ContextLengthExceeded,
    Overloaded,
    UpstreamError,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.pipeline import ProxyRequest, ProxyResponse
from proxy.retry import RetryBudget, backoff
from proxy.upstream import UpstreamClient

_MAX_ROUNDS = 32


class Upstream:
    """One engine serving one model: where it is, what it calls the model, how busy it is.

    Plain attributes for /ready and metrics: `inflight`, `queued`, `attempts`, `failures`,
    `breaker.current_state`.
    """

    def __init__(
        self,
        label: str,
        base_url: str,
        served_name: str,
        monitor: EngineMonitor,
        *,
        breaker: Breaker | None = None,
        api_key: str | None = None,
    ) -> None:
        self.label = label  # as configured ("engine:tiny" or the URL): safe for headers, logs
        self.label_bytes = label.encode()
        self.base_url = base_url
        self.served_name = served_name
        self.monitor = monitor
        # The engine's own key (the proxy's, never the client's), sent as Authorization.
        self.auth = f"Bearer {api_key}" if api_key else None
        self.breaker = breaker if breaker is not None else Breaker(label)
        self.admission: Admission | None = None  # the model's waiting room (ModelRoute.add)
        self.inflight = 0
        self.attempts = 0  # requests sent, retries included
        self.failures = 0  # attempts that failed (transport, timeout, 5xx)

    def __repr__(self) -> str:
        return f"Upstream({self.label!r}, inflight={self.inflight})"

    @property
    def queued(self) -> int:
        """Requests waiting for a slot on this model's upstreams."""
        return self.admission.waiting if self.admission is not None else 0


@dataclass(eq=False)
class ModelRoute:
    name: str
    upstreams: list[Upstream] = field(default_factory=list)
    admission: Admission = field(default_factory=Admission)

    def add(self, upstream: Upstream) -> None:
        upstream.admission = self.admission
        self.upstreams.append(upstream)

    def pick(self) -> Upstream:
        """Least outstanding requests among available upstreams (any, if none is): the
        balancer's choice without affinity or queues, for side calls such as /tokenize."""
        chosen = pick(self.upstreams, Choice())
        return chosen or min(self.upstreams, key=lambda u: u.inflight)


class Forwarder:
    """Terminal handler: the request leaves the proxy here, for a configured upstream only."""

    def __init__(
        self,
        client: UpstreamClient,
        routes: dict[str, ModelRoute],
        resilience: ResilienceConfig | None = None,
        chains: dict[str, list[str]] | None = None,
        *,
        max_decoded: int = 32 * 1024 * 1024,
    ) -> None:
        self._routes = routes
        self._sender = Sender(client, max_decoded)
        cfg = resilience or ResilienceConfig()
        self._retry = cfg.retry
        self._backpressure = cfg.backpressure
        self._affinity = cfg.affinity_messages if cfg.affinity == "prefix" else 0
        self.budget = RetryBudget(cfg.retry.budget_ratio, cfg.retry.budget_min)
        chains = chains or {name: [name] for name in routes}
        self._chains = {name: [routes[m] for m in models] for name, models in chains.items()}
        # vLLM's "prompt too long" 400 becomes ContextLengthExceeded only where some other
        # model may take the request (proxy.fallback); elsewhere it passes through unchanged.
        self._overflow = {name for name, models in chains.items() if len(models) > 1}

    async def __call__(self, request: ProxyRequest) -> ProxyResponse:
        budget = self.budget
        budget.enter()
        try:
            return await self._serve(request)
        finally:
            budget.leave()

    async def _serve(self, request: ProxyRequest) -> ProxyResponse:
        chain = self._chains[request.model]
        retry = self._retry
        deadline = time.monotonic() + retry.deadline
        key = affinity_key(request.body, self._affinity) if self._affinity else None
        priority = request.key.priority if request.key is not None else 0
        bp = self._backpressure
        kv_limit = bp.kv_cache_threshold if priority < bp.protected_priority else None
        tried: list[Upstream] = []
        failure: UpstreamError | None = None
        attempt = 0
        # Decided once: a retry must not mistake our own include_usage for the client's.
        strip_usage = request.stream and not _wants_usage(request.body)
        while True:
            lease = await self._lease(
                request, chain, tried, failure, attempt, deadline, key, kv_limit, priority
            )
            attempt += 1
            try:
                response = await self._attempt(lease, request, strip_usage)
            except UpstreamError as exc:
                failure = exc
                tried.append(lease.upstream)
                if (
                    attempt >= retry.attempts
                    or time.monotonic() >= deadline
                    or not (_free_failover(exc, chain, tried) or self.budget.spend())
                ):
                    if attempt > 1:
                        request.outcome["retries"] = attempt - 1
                    raise
                continue
            if attempt > 1:
                request.outcome["retries"] = attempt - 1
            if lease.route is not chain[0]:
                request.outcome["fallback"] = _reason(failure, chain[0])
            request.served_by = f"{lease.upstream.label} {lease.route.name}"
            return response

    async def _lease(
        self,
        request: ProxyRequest,
        chain: list[ModelRoute],
        tried: list[Upstream],
        failure: UpstreamError | None,
        attempt: int,
        deadline: float,
        key: int | None,
        kv_limit: float | None,
        priority: int,
    ) -> Lease:
        """Choose an upstream and hold a slot (and a probe) on it, or raise why not."""
        refused: list[Upstream] = []
        slept = False
        # Each round either returns or excludes one more upstream (or sleeps once): bounded.
        for _ in range(_MAX_ROUNDS):
            choice = Choice()
            route = choose(chain, choice, tried, refused, key, kv_limit)
            upstream = choice.upstream
            if route is None or upstream is None:
                if failure is not None:
                    raise failure
                if choice.kv_blocked:
                    raise chain[0].admission.refuse(request.outcome, "kv_cache")
                raise _circuit_open(chain, request)
            if upstream in tried and not slept:
                # Only the upstreams that already failed us are left: back off first.
                delay = backoff(attempt, self._retry.backoff_base, self._retry.backoff_max)
                if failure is not None and time.monotonic() + delay >= deadline:
                    raise failure
                await asyncio.sleep(delay)
                slept = True
                continue
            admission = route.admission
            if not admission.take(upstream):
                limit = max(0.0, deadline - time.monotonic())
                upstream = await admission.wait(request.outcome, priority, limit)
            try:
                probe = upstream.breaker.admit()
            except CircuitOpen:
                admission.release(upstream)
                refused.append(upstream)
                continue
            return Lease(route, upstream, probe)
        raise failure or _circuit_open(chain, request)

    async def _attempt(
        self, lease: Lease, request: ProxyRequest, strip_usage: bool
    ) -> ProxyResponse:
        """One upstream attempt with its accounting: breaker outcome, slot, counters."""
        upstream = lease.upstream
        upstream.attempts += 1
        overflow = request.model in self._overflow
        send = self._sender.send
        try:
            timeout = self._retry.attempt_timeout
            if timeout is None:
                response = await send(upstream, request, lease, strip_usage, overflow)
            else:
                try:
                    async with asyncio.timeout(timeout):
                        response = await send(upstream, request, lease, strip_usage, overflow)
                except TimeoutError:
                    raise UpstreamTimeout(
                        f"Upstream {upstream.label} sent nothing within the attempt timeout."
                    ) from None
        except UpstreamError:
            lease.failed()
            lease.release()
            raise
        except ContextLengthExceeded:
            lease.succeeded()  # the engine answered, correctly
            lease.release()
            raise
        except Overloaded as exc:
            # The proxy's own connection pool stayed full (proxy.upstream.upstream_errors): a
            # local limit, neither a failure nor a success of the engine, and nothing was sent.
            # Shed like a full queue; a retry would find no free connection either.
            upstream.attempts -= 1
            lease.abandoned()
            lease.release()
            raise lease.route.admission.refuse(request.outcome, "pool_full") from exc
        except asyncio.CancelledError as exc:
            if timed_out(exc):
                lease.failed()
            else:
                lease.abandoned()  # the client left: not the upstream's fault
            lease.release()
            raise
        except BaseException:
            lease.abandoned()
            lease.release()
            raise
        lease.succeeded()
        if response.stream is None:
            lease.release()
        return response


def _free_failover(exc: UpstreamError, chain: list[ModelRoute], tried: list[Upstream]) -> bool:
    """A refused connection never reached an engine: moving the request to an upstream not yet
    tried adds no engine load, so it is not paid from the retry budget (the breaker stops
    the dead upstream being tried after fail_max)."""
    if not isinstance(exc, UpstreamUnreachable):
        return False
    return any(u not in tried for route in chain for u in route.upstreams)


def _wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _circuit_open(chain: list[ModelRoute], request: ProxyRequest) -> CircuitOpen:
    waits = []
    for route in chain:
        for u in route.upstreams:
            if not u.breaker.allows():
                u.breaker.rejected += 1
                waits.append(u.breaker.retry_in())
    request.outcome["breaker"] = "open"
    wait = max(1, round(min(waits))) if waits else 1
    return CircuitOpen(
        f"No upstream of model `{request.model}` can take requests now (circuit breaker open).",
        headers={"retry-after": str(wait)},
    )


def _reason(failure: UpstreamError | None, first: ModelRoute) -> str:
    """Why a request left its model for a fallback, as a short label."""
    if isinstance(failure, UpstreamTimeout):
        return "timeout"
    if isinstance(failure, UpstreamUnreachable):
        return "unreachable"
    if isinstance(failure, UpstreamServerError):
        return "server_error"
    if failure is not None:
        return "upstream_error"
    if any(u.breaker.current_state != "closed" for u in first.upstreams):
        return "breaker_open"
    return "unhealthy"
