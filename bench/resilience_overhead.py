"""What the resilience layer costs per request: proxy.forward against the forwarder without it.

In-process, on an in-memory upstream client (no sockets), so only the forwarding code differs:
the core path (pick least outstanding, send, relay) and the resilient one (breaker admission and
outcome, slot and queue, retry budget, stream peek). The figure to hold against the whole
proxy's CPU per request (bench/proxy_bench.py) is the difference in microseconds.

    .venv/bin/python bench/resilience_overhead.py [--requests 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from starlette.datastructures import Headers

from engine.monitor import EngineMonitor
from proxy.errors import UpstreamServerError
from proxy.forward import Forwarder, ModelRoute, Upstream
from proxy.pipeline import ProxyRequest, ProxyResponse
from proxy.sse import UsageTap, usage_of
from proxy.upstream import UpstreamClient, UpstreamResponse, upstream_errors

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}
_USAGE = {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24}
WHOLE = orjson.dumps(
    {
        "id": "x",
        "object": "chat.completion",
        "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi " * 16}}],
        "usage": _USAGE,
    }
)
_HEAD = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "tiny"}
EVENTS = [
    b"data: "
    + orjson.dumps({**_HEAD, "choices": [{"index": 0, "delta": {"content": " tok"}}]})
    + b"\n\n"
    for _ in range(65)
]
EVENTS.append(b"data: " + orjson.dumps({**_HEAD, "choices": [], "usage": _USAGE}) + b"\n\n")
EVENTS.append(b"data: [DONE]\n\n")


class _Response:
    def __init__(self, stream: bool) -> None:
        self.status_code = 200
        self.headers: Mapping[str, str] = {"content-type": "application/json"}
        self._stream = stream

    async def aread(self) -> bytes:
        return WHOLE

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        for event in EVENTS:
            yield event

    async def aclose(self) -> None:
        return None


class NullClient:
    """The UpstreamClient protocol answered from memory."""

    def build_request(
        self, method: str, url: str, *, content: bytes, headers: dict[str, str]
    ) -> Any:
        return headers

    async def send(self, request: Any, *, stream: bool = True) -> UpstreamResponse:
        return _Response(request["accept"] == "text/event-stream")

    async def aclose(self) -> None:
        return None


class CoreForwarder:
    """The forwarder before the resilience layer (pick, send, relay), for comparison."""

    def __init__(self, client: UpstreamClient, routes: dict[str, ModelRoute]) -> None:
        self._client = client
        self._routes = routes

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
        strip = False
        if request.stream:
            options = body.get("stream_options")
            if not isinstance(options, dict):
                options = body["stream_options"] = {}
            strip = options.get("include_usage") is not True
            options["include_usage"] = True
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream" if request.stream else "application/json",
            "accept-encoding": "identity",
            "x-request-id": request.request_id,
        }
        out = self._client.build_request(
            "POST",
            f"{upstream.base_url}/v1/{request.route}",
            content=orjson.dumps(body),
            headers=headers,
        )
        with upstream_errors(upstream.label):
            response = await self._client.send(out, stream=True)
        if request.stream:
            return ProxyResponse(
                200,
                "text/event-stream",
                stream=aiter(UsageTap(_relay(response), request, strip=strip)),
            )
        content = await response.aread()
        await response.aclose()
        if response.status_code >= 500:
            raise UpstreamServerError("failed")
        request.usage = usage_of(content)
        return ProxyResponse(200, "application/json", body=content)


async def _relay(response: UpstreamResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()


def routes() -> dict[str, ModelRoute]:
    route = ModelRoute("tiny")
    for port in (8001, 8002):
        monitor = EngineMonitor(None, f"http://127.0.0.1:{port}", "tiny")  # type: ignore[arg-type]
        monitor.healthy = True
        monitor.kv_cache_usage = 0.1
        route.add(Upstream(f"http://127.0.0.1:{port}", monitor.base_url, "tiny", monitor))
    return {"tiny": route}


async def run(handler: Any, requests: int, stream: bool) -> float:
    headers = Headers({})
    started = time.process_time()
    for i in range(requests):
        body = {**BODY, "stream": stream}
        request = ProxyRequest("chat/completions", "tiny", body, headers, str(i), stream)
        response = await handler(request)
        if response.stream is not None:
            async for _ in response.stream:
                pass
            await response.stream.aclose()  # type: ignore[attr-defined]
    return (time.process_time() - started) / requests * 1e6


async def main_async(args: argparse.Namespace) -> None:
    client = NullClient()
    for stream, label in ((False, "non-streaming request"), (True, "stream of 66 events")):
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name in ("core", "resilient"):
                r = routes()
                handler: Any = CoreForwarder(client, r) if name == "core" else Forwarder(client, r)
                n = args.requests if not stream else args.requests // 10
                us = await run(handler, n, stream)
                best[name] = min(best.get(name, us), us)
        extra = best["resilient"] - best["core"]
        print(
            f"{label:24} core {best['core']:7.1f} us   resilient {best['resilient']:7.1f} us"
            f"   extra {extra:+6.1f} us"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    try:
        import uvloop

        uvloop.run(main_async(p.parse_args()))
    except ImportError:
        asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
