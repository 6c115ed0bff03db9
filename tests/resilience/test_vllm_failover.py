"""End to end: two real vLLM CPU engines behind one model; one is killed mid-run.

The session's engine (tests.vllm_fixtures) plus a second one started here with the same launch
code, both pinned to core 0. Under steady load the second is SIGKILLed (its whole process
group, as a crash would): requests keep succeeding on the first, the proxy marks the dead one
down (health probe and breaker), and once it is started again it serves again.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine import launch, procs
from proxy.core.config import EngineConfig
from tests.proxy.helpers import CHAT_PATH, chat
from tests.resilience.conftest import Gateway, GatewayFactory, config
from tests.vllm_fixtures import (
    MAX_MODEL_LEN,
    SERVED_NAME,
    VllmServer,
    free_port,
    require_engine_python,
    start_engine,
    wait_healthy,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


class SecondEngine:
    """A vLLM server this test can kill and start again on the same port."""

    def __init__(self, model_dir: Path, work: Path) -> None:
        self.work = work
        self.cfg = EngineConfig(
            model=str(model_dir),
            served_name=SERVED_NAME,
            port=free_port(),
            build="cpu",
            python=str(require_engine_python()),
            max_model_len=MAX_MODEL_LEN,
            kv_cache_bytes=256 * 1024 * 1024,
            enforce_eager=True,
            cpu_cores="0",  # the shared core, like the session's engine
            runtime_dir=str(work / "run"),
        )
        self.base_url = launch.base_url(self.cfg)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> float:
        self.starts += 1
        log_path = self.work / f"vllm-{self.starts}.log"
        self.proc = start_engine("second", self.cfg, log_path)
        return wait_healthy(self.base_url, self.proc, log_path)

    def kill(self) -> None:
        assert self.proc is not None
        procs.signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + 10
        while procs.group_members(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            procs.stop_group(self.proc.pid, timeout=15.0)
            self.proc.wait(10)


@pytest.fixture
def second_engine(tiny_model_dir: Path, tmp_path: Path) -> Iterator[SecondEngine]:
    engine = SecondEngine(tiny_model_dir, tmp_path)
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()


async def run_load(gw: Gateway, seconds: float, workers: int) -> list[tuple[float, int, str]]:
    """Closed-loop short completions; (start time, status, upstream that served) for each."""
    results: list[tuple[float, int, str]] = []
    stop_at = time.monotonic() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            began = time.monotonic()
            r = await client.post(CHAT_PATH, json=chat(tokens=8))
            results.append((began, r.status_code, r.headers.get("x-vgate-upstream", "")))

    async with httpx.AsyncClient(base_url=gw.base_url, timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(workers)))
    return results


async def ready(gw: Gateway) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=5) as client:
        return await client.get("/ready")


async def upstream_state(gw: Gateway, url: str) -> dict[str, object]:
    state: dict[str, object] = (await ready(gw)).json()["upstreams"]["tiny"][url]
    return state


async def test_killed_engine_is_routed_around_marked_down_and_back_when_restarted(
    vllm_server: VllmServer, second_engine: SecondEngine, gateway: GatewayFactory
) -> None:
    first, second = vllm_server.base_url, second_engine.base_url
    gw = gateway(
        config(
            {"tiny": {"upstreams": [first, second], "served_name": SERVED_NAME}},
            {"breaker": {"fail_max": 3, "reset_timeout": 2.0}},
            upstream={"health_interval": 0.5, "metrics_interval": 5.0},
        )
    )
    warm = await run_load(gw, 2.0, workers=4)
    assert {status for _, status, _ in warm} == {200}
    assert {served.split()[0] for _, _, served in warm} == {first, second}

    async def kill_soon() -> float:
        await asyncio.sleep(1.5)
        await asyncio.to_thread(second_engine.kill)
        return time.monotonic()

    killer = asyncio.create_task(kill_soon())
    during = await run_load(gw, 5.0, workers=4)
    killed_at = await killer
    assert Counter(status for _, status, _ in during) == Counter({200: len(during)})
    after = [served for began, _, served in during if began > killed_at + 0.1]
    assert after and all(served.startswith(first) for served in after)

    state = await upstream_state(gw, second)
    assert state["healthy"] is False
    assert (await ready(gw)).status_code == 200  # the model still has a healthy engine

    await asyncio.to_thread(second_engine.start)
    deadline = time.monotonic() + 30
    while (await upstream_state(gw, second))["healthy"] is not True:
        assert time.monotonic() < deadline, "the restarted engine was never marked up"
        await asyncio.sleep(0.25)
    await asyncio.sleep(2.0)  # the breaker's reset timeout, if it opened
    back = await run_load(gw, 3.0, workers=4)
    assert {status for _, status, _ in back} == {200}
    assert any(served.startswith(second) for _, _, served in back)
    assert (await upstream_state(gw, second))["breaker"] == "closed"
