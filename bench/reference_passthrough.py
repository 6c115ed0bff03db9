"""The calibration point of bench/proxy_bench.py: a minimal Starlette + aiohttp pass-through.

No validation, no policies, no streaming relay worth the name: the ceiling a Python proxy on
this stack can reach on this machine. The performance notes measured this design at 0.11 ms CPU
per request; comparing vgate with it in the same run separates what the machine costs from what
vgate costs.

    python bench/reference_passthrough.py --port 8080 --upstream http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def app(upstream: str) -> Starlette:
    sessions: list[aiohttp.ClientSession] = []

    async def chat(request: Request) -> Response:
        body = await request.body()
        if not sessions:
            sessions.append(aiohttp.ClientSession())
        r = await sessions[0].post(
            f"{upstream}/v1/chat/completions",
            data=body,
            headers={"content-type": "application/json"},
        )
        if r.headers.get("content-type", "").startswith("text/event-stream"):

            async def relay() -> AsyncIterator[bytes]:
                async for chunk in r.content.iter_any():
                    yield chunk
                r.release()

            return StreamingResponse(relay(), media_type="text/event-stream")
        data = await r.read()
        return Response(data, status_code=r.status, media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    args = p.parse_args()
    uvicorn.run(
        app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
