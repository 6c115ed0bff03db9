"""The record of one finished request, from the endpoint to the observer and the metrics."""

from __future__ import annotations

from proxy.core.errors import VgateError
from proxy.core.pipeline import ProxyRequest


class Finished:
    """One finished request, as the endpoint saw it; times are `time.perf_counter()` values.

    Defaults live on the class: the endpoint sets what it learns as it goes, and a request that
    ends early costs only the fields it reached.
    """

    request: ProxyRequest | None = None  # None when the body never became a request
    model: str | None = None  # as the client sent it (None when it never said)
    status = 500  # until an answer is known: an exception escaping the endpoint is a bug
    error: VgateError | None = None
    cancelled = False
    stream_started = False
    first_byte_at = 0.0
    # Filled in by Observer.finish.
    wall = 0.0
    request_id = ""
    label = "unknown"
    outcome = ""
    latency = 0.0
    ttft: float | None = None

    def __init__(self, route: str, method: str, path: str, started_at: float) -> None:
        self.route = route  # the route family's name
        self.method = method
        self.path = path  # as requested (a templated route's own path: /v1/responses/ID)
        self.started_at = started_at
