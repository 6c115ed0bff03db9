"""What the default policy pipeline costs: auth + ratelimit + truncate (its cheap bound).

Two figures. In-process: microseconds of CPU each policy adds to one non-streaming request
against a null endpoint. End to end: `vgate serve` on core 1 without policies and with the
pipeline (fake upstream and this load generator on core 0, as in proxy_bench.py), proxy CPU per
request and requests/s at 16 connections, the two configs alternated to share the machine's
noise. The issue's bar: the pipeline costs at most 20% of the core's throughput.

    .venv/bin/python bench/policy_overhead.py [--seconds 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
from starlette.datastructures import Headers

from engine.monitor import EngineMonitor
from policies import build_policies
from policies.auth import new_key
from proxy import config as config_module
from proxy.forward import ModelRoute, Upstream
from proxy.pipeline import ProxyRequest, ProxyResponse, chain
from proxy.runtime import Services
from tests.fakes.vllm import FakeVLLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy_bench import VGATE, cpu_seconds, free_port, process

N = 50_000
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}


async def null(request: ProxyRequest) -> ProxyResponse:
    request.usage = {"prompt_tokens": 9, "completion_tokens": 16, "total_tokens": 25}
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
        route.add(Upstream(fake.base_url, fake.base_url, "tiny", monitor))
        services = Services(cfg, client, {"tiny": route})
        handler = chain(build_policies(cfg, "tiny", services), null)
        headers = Headers(headers={"authorization": f"Bearer {key}"})

        def request() -> ProxyRequest:
            body = dict(BODY)
            return ProxyRequest("chat/completions", "tiny", body, headers, "rid", False)

        await handler(request())  # warm: truncate measures the template once
        started = time.process_time()
        for _ in range(N):
            await handler(request())
        return (time.process_time() - started) / N * 1e6


def pipeline_config(order: list[str], digest: str) -> str:
    keys = ", ".join(f'{{ name = "k{i}", sha256 = "{new_key()[1]}" }}' for i in range(99))
    return f"""
[policies]
order = {orjson.dumps(order).decode()}

[policies.auth]
keys = [{keys}, {{ name = "bench", sha256 = "{digest}" }}]

[policies.ratelimit]
overall = {{ requests_per_minute = 1000000000, tokens_per_minute = 1000000000000 }}
per_key = {{ requests_per_minute = 1000000000, tokens_per_minute = 1000000000000 }}

[policies.truncate]
strategy = "drop_oldest"
"""


async def load(url: str, key: str, seconds: float, concurrency: int = 16) -> int:
    body = orjson.dumps(BODY)
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    done = 0
    deadline = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                assert r.status == 200, r.status
            done += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return done


async def end_to_end(seconds: float, rounds: int) -> None:
    key, digest = new_key()
    fake_port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        fake_cmd = [sys.executable, "-m", "tests.fakes.vllm", "--port", str(fake_port)]
        with process(["taskset", "-c", "0", *fake_cmd], fake_port, Path(tmp) / "fake.log"):
            totals: dict[str, list[float]] = {"none": [0, 0, 0], "default": [0, 0, 0]}
            for _ in range(rounds):
                for name, order in (("none", []), ("default", ["auth", "ratelimit", "truncate"])):
                    port = free_port()
                    cfg = Path(tmp) / f"{name}.toml"
                    cfg.write_text(
                        f"[server]\nport = {port}\n[logging]\nrequests = false\n"
                        "[upstream]\nhealth_interval = 60.0\nmetrics_interval = 60.0\n"
                        f'[models.tiny]\nupstreams = ["http://127.0.0.1:{fake_port}"]\n'
                        + (pipeline_config(order, digest) if order else "")
                    )
                    cmd = ["taskset", "-c", "1", str(VGATE), "serve", "--config", str(cfg)]
                    with process(cmd, port, Path(tmp) / f"{name}.log") as proxy:
                        url = f"http://127.0.0.1:{port}/v1/chat/completions"
                        await load(url, key, 1.0)  # warm up (truncate measures its template)
                        cpu0, t0 = sum(cpu_seconds(proxy.pid)), time.monotonic()
                        count = await load(url, key, seconds)
                        cpu1, t1 = sum(cpu_seconds(proxy.pid)), time.monotonic()
                    totals[name][0] += cpu1 - cpu0
                    totals[name][1] += count
                    totals[name][2] += t1 - t0
    for name, (cpu, count, wall) in totals.items():
        print(
            f"end to end, {name:>7} pipeline: {cpu * 1e6 / count:6.1f} us proxy CPU/request, "
            f"{count / wall:7.0f} req/s at c=16"
        )
    base = totals["none"][0] / totals["none"][1]
    full = totals["default"][0] / totals["default"][1]
    print(f"default pipeline: +{(full / base - 1) * 100:.1f}% CPU per request")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    key, digest = new_key()
    with FakeVLLM() as fake:
        base = await measure([], fake, key, digest)
        print(f"in-process, empty pipeline: {base:.1f} us/request")
        for order in (["auth"], ["auth", "ratelimit"], ["auth", "ratelimit", "truncate"]):
            cost = await measure(order, fake, key, digest)
            print(f"in-process, {' + '.join(order)}: +{cost - base:.1f} us/request")
    os.sched_setaffinity(0, {0})
    await end_to_end(args.seconds, args.rounds)


if __name__ == "__main__":
    asyncio.run(main())
