"""The floor of bench/proxy_bench.py: uvicorn and vgate's own upstream client, nothing else.

A raw ASGI app that forwards the body and relays the answer (whole or streamed chunk by chunk)
with `proxy.upstream.wire.WireClient`: no validation, no policies, no timeouts, no metrics. What is
left is the cost of uvicorn, asyncio and the sockets: vgate's figures minus these are what
vgate's own logic costs, on whatever machine runs them.

    python bench/floor_passthrough.py --port 8080 --upstream http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn
from starlette.types import Receive, Scope, Send

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.upstream.wire import WireClient


def app(upstream: str) -> object:
    client = WireClient(max_connections=1000, connect_timeout=5.0, keepalive_expiry=4.0)
    url = f"{upstream}/v1/chat/completions"
    json = {"content-type": "application/json"}

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        response = await client.send(client.build_request("POST", url, content=body, headers=json))
        kind = response.headers.get("content-type", "application/json").encode()
        if kind.startswith(b"text/event-stream"):
            start = {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", kind)],
            }
            await send(start)
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        data = await response.aread()
        headers = [(b"content-type", kind), (b"content-length", str(len(data)).encode())]
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        await send({"type": "http.response.body", "body": data})

    return asgi


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    args = p.parse_args()
    uvicorn.run(
        app(args.upstream),  # type: ignore[arg-type]
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
