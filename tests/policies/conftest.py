"""Fixtures for the policy tests: a real redis-server, API keys, direct policy construction."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from engine.client.monitor import EngineMonitor
from policies.auth import new_key
from policies.services import Services
from proxy.runtime import load as config_module
from proxy.upstream.breaker import ConsecutiveBreaker
from proxy.upstream.model import ModelRoute, Upstream
from tests.vllm_fixtures import free_port


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, without persistence, for the session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (make system-packages)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=1)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("redis-server did not start")
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def api_key() -> tuple[str, str]:
    """(key, sha256 hex) of a fresh key."""
    return new_key()


def auth_table(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(keys)}


def make_services(
    client: httpx.AsyncClient,
    policies: dict[str, Any],
    upstream_url: str,
    max_model_len: int | None,
    others: tuple[str, ...] = (),
) -> Services:
    """Services for building policies directly: one model `tiny` on `upstream_url` (and
    `others` configured on it too, for policies that name a second model)."""
    models = {name: {"upstreams": [upstream_url]} for name in ("tiny", *others)}
    cfg = config_module.from_dict({"models": models, "policies": policies}, "<test>")
    monitor = EngineMonitor(client, upstream_url, "tiny")
    monitor.max_model_len = max_model_len
    route = ModelRoute("tiny")
    route.add(Upstream(upstream_url, upstream_url, "tiny", monitor, ConsecutiveBreaker("tiny")))
    return Services(cfg, client, {"tiny": route})
