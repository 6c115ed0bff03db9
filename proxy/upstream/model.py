"""The upstream data model: engines serving a model, and the model's set of them.

Plain attributes for /ready and metrics: `inflight`, `queued`, `attempts`, `failures`,
`breaker.current_state`. Everything that decides (balancing, breaking, retrying) is a module of
`proxy.upstream.modules` holding or reading these; nothing here imports the orchestrator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.client.monitor import EngineMonitor
from proxy.upstream.admission import Admission
from proxy.upstream.modules import Breaker
from proxy.upstream.wire import Tls


class Upstream:
    """One engine serving one model: where it is, what it calls the model, how busy it is."""

    def __init__(
        self,
        label: str,
        base_url: str,
        served_name: str,
        monitor: EngineMonitor,
        breaker: Breaker,
        *,
        api_key: str | None = None,
        tls: Tls | None = None,
        priority_scheduling: bool = False,
    ) -> None:
        self.label = label  # as configured ("engine:tiny" or the URL): safe for headers, logs
        self.label_bytes = label.encode()
        self.base_url = base_url
        self.served_name = served_name
        self.monitor = monitor
        # The engine's own key (the proxy's, never the client's), sent as Authorization.
        self.api_key = api_key
        self.auth = f"Bearer {api_key}" if api_key else None
        self.tls = tls
        # The engine schedules by `priority` (vLLM's `--scheduling-policy priority`): requests
        # of a key carry its priority (proxy.upstream.attempt).
        self.priority_scheduling = priority_scheduling
        self.breaker = breaker
        self.admission: Admission[Upstream] | None = (
            None  # the model's waiting room (ModelRoute.add)
        )
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
    admission: Admission[Upstream] = field(default_factory=Admission)

    def add(self, upstream: Upstream) -> None:
        upstream.admission = self.admission
        self.upstreams.append(upstream)

    def window(self) -> int | None:
        """The model's context window: the smallest its upstreams report, since a request
        must fit whichever of them serves it (None until one reports)."""
        known = [u.monitor.max_model_len for u in self.upstreams if u.monitor.max_model_len]
        return min(known) if known else None
