"""Two real `vgate serve` processes on one real redis-server enforce one limit, not two."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes.vllm import FakeVLLM
from tests.vllm_fixtures import free_port

pytestmark = pytest.mark.redis

CONFIG = """
[server]
port = {port}
drain_timeout = 1.0

[upstream]
health_interval = 30.0
metrics_interval = 30.0

[models.tiny]
upstreams = ["{upstream}"]

[policies]
order = ["ratelimit"]

[policies.ratelimit]
storage = "{redis}"
key_prefix = "{prefix}"
overall = {{ requests_per_minute = 4, tokens_per_minute = 100000 }}
"""


@pytest.fixture
def two_proxies(redis_url: str, fake: FakeVLLM, tmp_path: Path) -> Iterator[list[str]]:
    prefix = f"test:{uuid.uuid4().hex}"
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for i in range(2):
            port = free_port()
            path = tmp_path / f"vgate{i}.toml"
            path.write_text(
                CONFIG.format(port=port, upstream=fake.base_url, redis=redis_url, prefix=prefix)
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "proxy.cli", "serve", "--config", str(path)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs, strict=True):
            _wait_up(url, proc)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=15)


def _wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vgate serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail("vgate serve did not come up")


def test_two_processes_share_one_budget(two_proxies: list[str], fake: FakeVLLM) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    statuses = [
        httpx.post(f"{two_proxies[i % 2]}/v1/chat/completions", json=body, timeout=10)
        for i in range(8)
    ]
    assert [r.status_code for r in statuses] == [200] * 4 + [429] * 4
    # Each process reports the shared state: the last success saw the budget empty.
    assert statuses[3].headers["x-ratelimit-remaining-requests"] == "0"
    assert all(r.headers["x-ratelimit-limit-requests"] == "4" for r in statuses)
    assert len(fake.completions) == 4
