"""What each policy costs: auth + ratelimit + truncate (its cheap bound), in-process.

Microseconds of CPU each policy adds to one non-streaming request against a null endpoint.
End to end, over sockets, `proxy_bench.py --profile full` against `--profile core` measures the
whole pipeline (with resilience and observability) as the issues' bars ask.

    PYTHONPATH=. .venv/bin/python bench/policy_overhead.py
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import httpx
from starlette.datastructures import Headers

from engine.client.monitor import EngineMonitor
from policies import build_policies
from policies.auth import new_key
from policies.services import Services
from proxy.api.chat import ChatCompletions
from proxy.core.api import Usage
from proxy.core.pipeline import ProxyRequest, ProxyResponse, chain
from proxy.runtime import load as config_module
from proxy.upstream.breaker import ConsecutiveBreaker
from proxy.upstream.model import ModelRoute, Upstream
from tests.fakes.vllm import FakeVLLM

N = 50_000
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}


async def null(request: ProxyRequest) -> ProxyResponse:
    request.usage = Usage(9, 16)
    return ProxyResponse(200, "application/json", b"{}")


async def measure(order: list[str], fake: FakeVLLM, key: str, digest: str) -> float:
    keys = [{"name": f"k{i}", "sha256": new_key()[1]} for i in range(99)]
    keys.append({"name": "bench", "sha256": digest})
    policies: dict[str, Any] = {
        "order": order,
        "auth": {"keys": keys},
        "ratelimit": {
            "overall": {"requests_per_minute": 10**9, "tokens_per_minute": 10**12},
            "per_key": {"requests_per_minute": 10**9, "tokens_per_minute": 10**12},
        },
        "truncate": {"strategy": "drop_oldest"},
    }
    cfg = config_module.from_dict(
        {"models": {"tiny": {"upstreams": [fake.base_url]}}, "policies": policies}, "<bench>"
    )
    async with httpx.AsyncClient() as client:
        monitor = EngineMonitor(client, fake.base_url, "tiny")
        monitor.max_model_len = 2048
        route = ModelRoute("tiny")
        route.add(Upstream(fake.base_url, fake.base_url, "tiny", monitor, ConsecutiveBreaker("t")))
        services = Services(cfg, client, {"tiny": route})
        handler = chain(build_policies(cfg, "tiny", services), null)
        headers = Headers(headers={"authorization": f"Bearer {key}"})

        def request() -> ProxyRequest:
            body = dict(BODY)
            return ProxyRequest(ChatCompletions(), "tiny", body, headers, "rid", False)

        await handler(request())  # warm: truncate measures the template once
        started = time.process_time()
        for _ in range(N):
            await handler(request())
        return (time.process_time() - started) / N * 1e6


async def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    ).parse_args()
    key, digest = new_key()
    with FakeVLLM() as fake:
        base = await measure([], fake, key, digest)
        print(f"in-process, empty pipeline: {base:.1f} us/request")
        for order in (["auth"], ["auth", "ratelimit"], ["auth", "ratelimit", "truncate"]):
            cost = await measure(order, fake, key, digest)
            print(f"in-process, {' + '.join(order)}: +{cost - base:.1f} us/request")


if __name__ == "__main__":
    asyncio.run(main())
