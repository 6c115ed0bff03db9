"""The pipeline's endpoint: send a request to one upstream and hand back its answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson

from engine.monitor import EngineMonitor
from proxy.errors import InvalidRequest, UpstreamServerError
from proxy.pipeline import ProxyRequest, ProxyResponse
from proxy.sse import UsageTap, usage_of
from proxy.upstream import UpstreamClient, UpstreamResponse, upstream_errors


@dataclass(eq=False)
class Upstream:
    """One engine serving one model: where it is, what it calls the model, how busy it is."""

    label: str  # as configured ("engine:tiny" or the URL): safe for headers, logs, metrics
    base_url: str
    served_name: str
    monitor: EngineMonitor
    inflight: int = 0

    @property
    def available(self) -> bool:
        # Unknown (not probed yet) counts as available: the first request is the probe.
        return self.monitor.healthy is not False


@dataclass(eq=False)
class ModelRoute:
    name: str
    upstreams: list[Upstream] = field(default_factory=list)

    def pick(self) -> Upstream:
        """Least outstanding requests among available upstreams (any, if none is)."""
        candidates = [u for u in self.upstreams if u.available] or self.upstreams
        return min(candidates, key=lambda u: u.inflight)


class Forwarder:
    """Terminal handler: the request leaves the proxy here, for a configured upstream only."""

    def __init__(
        self, client: UpstreamClient, routes: dict[str, ModelRoute], api_key: str | None
    ) -> None:
        self._client = client
        self._routes = routes
        self._auth = f"Bearer {api_key}" if api_key else None

    async def __call__(self, request: ProxyRequest) -> ProxyResponse:
        upstream = self._routes[request.model].pick()
        request.served_by = f"{upstream.label} {request.model}"
        upstream.inflight += 1
        try:
            return await self.send(upstream, request)
        finally:
            upstream.inflight -= 1

    async def send(self, upstream: Upstream, request: ProxyRequest) -> ProxyResponse:
        body = request.body
        body["model"] = upstream.served_name
        strip_usage = False
        if request.stream:
            # Always ask for usage: token limits and metrics reconcile from it. The client sees
            # the usage event only if it asked.
            options = body.get("stream_options")
            if not isinstance(options, dict):
                options = body["stream_options"] = {}
            strip_usage = options.get("include_usage") is not True
            options["include_usage"] = True
        # Only headers we choose leave: never the client's Authorization, cookies, hop-by-hop
        # or custom-host headers; the URL is the configured upstream, whatever the body says.
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream" if request.stream else "application/json",
            "accept-encoding": "identity",
            "x-request-id": request.request_id,
        }
        if self._auth:
            headers["authorization"] = self._auth
        url = f"{upstream.base_url}/v1/{request.route}"
        try:
            content = orjson.dumps(body)
        except TypeError:
            # orjson reads 1024 levels of nesting but writes only 254: a 400, not a 500.
            raise InvalidRequest("Request body is nested too deeply.") from None
        outbound = self._client.build_request("POST", url, content=content, headers=headers)
        with upstream_errors(upstream.label):
            response = await self._client.send(outbound, stream=True)
        ok = response.status_code < 400
        if request.stream and ok:
            return ProxyResponse(
                status=response.status_code,
                content_type="text/event-stream; charset=utf-8",
                stream=aiter(
                    UsageTap(_relay(response, upstream.label), request, strip=strip_usage)
                ),
            )
        try:
            with upstream_errors(upstream.label):
                content = await response.aread()
        finally:
            await response.aclose()
        if response.status_code >= 500:
            # 5xx bodies can carry tracebacks and paths: the client gets a generic message.
            raise UpstreamServerError(
                f"The upstream failed to process the request (status {response.status_code})."
            )
        if response.status_code < 300:
            request.usage = usage_of(content)
        return ProxyResponse(
            status=response.status_code,
            content_type=response.headers.get("content-type", "application/json"),
            body=content,
        )


async def _relay(response: UpstreamResponse, label: str) -> AsyncIterator[bytes]:
    """The upstream's bytes as they arrive: no buffering, no re-framing."""
    try:
        with upstream_errors(label, started=True):
            async for chunk in response.aiter_raw():
                yield chunk
    finally:
        await response.aclose()
