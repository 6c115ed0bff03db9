"""The pipeline's endpoint: choose an upstream, send, retry or fail over, hand back the answer.

Per request a `Plan` holds what all its attempts share: the chain of models (its own, then its
fallbacks), the deadline, the affinity key, the KV-cache limit. Each attempt takes a `Lease` on
the balancer's choice among eligible upstreams (a slot, and a probe while the breaker is
half-open; waiting for a slot is bounded: proxy.upstream.admission), then sends
(proxy.upstream.attempt). A transport error, timeout or 5xx before the first byte reaches the
client is counted by that upstream's breaker and, while the retry policy allows, the request
moves to another upstream (or backs off and retries the same one). Once a byte has gone to the
client nothing is retried: a failure then ends the stream with an error event.

The balancer, the breakers, the retry policy and the fallback chains are modules
(proxy.upstream.modules); this file only sequences them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from proxy.core.api import StreamState
from proxy.core.config import BackpressureConfig
from proxy.core.errors import (
    CircuitOpen,
    ContextLengthExceeded,
    Overloaded,
    UpstreamError,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.core.pipeline import ProxyRequest, ProxyResponse
from proxy.upstream.attempt import Lease, Sender, timed_out
from proxy.upstream.balance import Choice, affinity_key, choose
from proxy.upstream.client import UpstreamClient
from proxy.upstream.model import ModelRoute, Upstream
from proxy.upstream.modules import Balancer, RetryPolicy

_MAX_ROUNDS = 32


@dataclass(slots=True)
class Plan:
    """One request's attempts: what they share, and what the failed ones taught."""

    request: ProxyRequest
    chain: list[ModelRoute]
    deadline: float
    key: int | None  # prefix affinity: which conversation this is
    kv_limit: float | None  # shed above this KV-cache usage (None: never, a protected key)
    priority: int
    state: StreamState  # how the stream is relayed (decided once, from the client's body)
    overflow: bool  # a "prompt too long" 400 may move the request to a longer model
    tried: list[Upstream] = field(default_factory=list)
    failure: UpstreamError | None = None
    attempts: int = 0


@dataclass(frozen=True)
class Modules:
    """The attempt-level modules of one runtime (built by proxy.upstream.registry)."""

    balancer: Balancer
    retry: RetryPolicy
    chains: dict[str, list[ModelRoute]]  # per model: itself, then its fallbacks in order


class Forwarder:
    """Terminal handler: the request leaves the proxy here, for a configured upstream only."""

    def __init__(
        self,
        client: UpstreamClient,
        modules: Modules,
        backpressure: BackpressureConfig,
        *,
        affinity_messages: int = 0,
        max_event_bytes: int = 4 * 1024 * 1024,
        max_decoded_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self._sender = Sender(client, max_event_bytes, max_decoded_bytes)
        self._modules = modules
        self.retry = self._retry = modules.retry  # public for metrics and tests
        self._balancer = modules.balancer
        self._backpressure = backpressure
        self._affinity = affinity_messages
        # A request pinned to one upstream (it holds what the request names) is tried there
        # only, within its model's admission: no balancing, no fallback.
        self._pinned: dict[tuple[str, str], list[ModelRoute]] = {}
        for name, chain in modules.chains.items():
            own = chain[0]
            for upstream in own.upstreams:
                view = ModelRoute(own.name, [upstream], own.admission)
                self._pinned.setdefault((name, upstream.label), [view])

    async def __call__(self, request: ProxyRequest) -> ProxyResponse:
        retry = self._retry
        retry.enter()
        try:
            return await self._serve(request)
        finally:
            retry.leave()

    def plan(self, request: ProxyRequest) -> Plan:
        if request.pin is None:
            chain = self._modules.chains[request.model]
        else:
            pinned = self._pinned.get((request.model, request.pin))
            if pinned is None:
                raise UpstreamUnreachable(
                    f"Upstream {request.pin}, which holds what the request names, is not an "
                    f"upstream of model `{request.model}`."
                )
            chain = pinned
        priority = request.key.priority if request.key is not None else 0
        bp = self._backpressure
        return Plan(
            request=request,
            chain=chain,
            deadline=time.monotonic() + self._retry.deadline,
            key=affinity_key(request.body, self._affinity) if self._affinity else None,
            kv_limit=bp.kv_cache_threshold if priority < bp.protected_priority else None,
            priority=priority,
            state=request.api.prepare(request.body, request.stream),
            # vLLM's "prompt too long" 400 becomes ContextLengthExceeded only where another
            # model may take the request (proxy.runtime.context_fallback).
            overflow=len(chain) > 1,
        )

    async def _serve(self, request: ProxyRequest) -> ProxyResponse:
        plan = self.plan(request)
        retry = self._retry
        outcome = request.outcome
        while True:
            lease = await self._lease(plan)
            plan.attempts += 1
            try:
                response = await self._attempt(lease, plan)
            except UpstreamError as exc:
                plan.failure = exc
                plan.tried.append(lease.upstream)
                if (
                    plan.attempts >= retry.attempts
                    or time.monotonic() >= plan.deadline
                    or not retry.allow(_free_failover(exc, plan))
                ):
                    if plan.attempts > 1:
                        outcome.retries = plan.attempts - 1
                    raise
                continue
            if plan.attempts > 1:
                outcome.retries = plan.attempts - 1
            if lease.route is not plan.chain[0]:
                outcome.fallback = _reason(plan.failure, plan.chain[0])
            request.served_by = f"{lease.upstream.label} {lease.route.name}"
            return response

    async def _lease(self, plan: Plan) -> Lease:
        """Choose an upstream and hold a slot (and a probe) on it, or raise why not."""
        refused: list[Upstream] = []
        slept = False
        outcome = plan.request.outcome
        # Each round either returns or excludes one more upstream (or sleeps once): bounded.
        for _ in range(_MAX_ROUNDS):
            choice = Choice()
            route = choose(
                plan.chain, choice, plan.tried, refused, plan.key, plan.kv_limit, self._balancer
            )
            upstream = choice.upstream
            if route is None or upstream is None:
                if plan.failure is not None:
                    raise plan.failure
                if choice.kv_blocked:
                    raise plan.chain[0].admission.refuse(outcome, "kv_cache")
                raise _circuit_open(plan)
            if upstream in plan.tried and not slept:
                # Only the upstreams that already failed us are left: back off first.
                delay = self._retry.backoff(plan.attempts)
                if plan.failure is not None and time.monotonic() + delay >= plan.deadline:
                    raise plan.failure
                await asyncio.sleep(delay)
                slept = True
                continue
            admission = route.admission
            if not admission.take(upstream):
                limit = max(0.0, plan.deadline - time.monotonic())
                upstream = await admission.wait(outcome, plan.priority, limit)
            try:
                probe = upstream.breaker.admit()
            except CircuitOpen:
                admission.release(upstream)
                refused.append(upstream)
                continue
            return Lease(route, upstream, probe)
        raise plan.failure or _circuit_open(plan)

    async def _attempt(self, lease: Lease, plan: Plan) -> ProxyResponse:
        """One upstream attempt with its accounting: breaker outcome, slot, counters."""
        upstream = lease.upstream
        upstream.attempts += 1
        request = plan.request
        # Each attempt relays with its own state: a retry starts its stream afresh.
        state = plan.state
        if plan.attempts > 1:
            state = plan.state = StreamState(strip_usage=state.strip_usage)
        send = self._sender.send
        try:
            timeout = self._retry.attempt_timeout
            if timeout is None:
                response = await send(request, lease, state, plan.overflow)
            else:
                try:
                    async with asyncio.timeout(timeout):
                        response = await send(request, lease, state, plan.overflow)
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
            # The proxy's own connection pool stayed full (proxy.core.transport): a local
            # limit, neither a failure nor a success of the engine, and nothing was sent. Shed
            # like a full queue; a retry would find no free connection either.
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


def _free_failover(exc: UpstreamError, plan: Plan) -> bool:
    """A refused connection never reached an engine: moving the request to an upstream not yet
    tried adds no engine load, so it is not paid from the retry budget (the breaker stops
    the dead upstream being tried after fail_max)."""
    if not isinstance(exc, UpstreamUnreachable):
        return False
    return any(u not in plan.tried for route in plan.chain for u in route.upstreams)


def _circuit_open(plan: Plan) -> CircuitOpen:
    waits = []
    for route in plan.chain:
        for u in route.upstreams:
            if not u.breaker.allows():
                u.breaker.rejected += 1
                waits.append(u.breaker.retry_in())
    plan.request.outcome.breaker = "open"
    wait = max(1, round(min(waits))) if waits else 1
    return CircuitOpen(
        f"No upstream of model `{plan.request.model}` can take requests now "
        "(circuit breaker open).",
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
