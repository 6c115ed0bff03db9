"""Fixtures for the resilience tests: several fake engines, and the real proxy in front of them.

`gateway(...)` starts the real app under uvicorn (tests.fakes.harness) and hands back its base
URL together with the live Runtime, so a test can assert on breaker state and slots as well as
on responses and on what the fakes saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from proxy.runtime.runtime import Runtime
from proxy.upstream.model import Upstream
from tests.fakes.harness import ProxyServer
from tests.fakes.vllm import FakeVLLM
from tests.vllm_fixtures import free_port


@dataclass
class Gateway:
    base_url: str
    server: ProxyServer

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.server.app.state.runtime()
        return runtime

    def upstream(self, model: str = "tiny", index: int = 0) -> Upstream:
        return self.runtime.routes[model].upstreams[index]


def config(
    models: dict[str, dict[str, Any]], resilience: dict[str, Any] | None = None, **sections: Any
) -> dict[str, Any]:
    """A proxy config: fast shutdown, monitors that poll rarely (probes stay out of counts)."""
    data: dict[str, Any] = {
        "server": {"drain_timeout": 1.0},
        "upstream": {"health_interval": 30.0, "metrics_interval": 30.0},
        "models": models,
        "resilience": resilience or {},
        "logging": {"requests": False},
    }
    for name, table in sections.items():
        data[name] = {**data.get(name, {}), **table}
    return data


def closed_port_url() -> str:
    """A loopback URL nothing listens on (the port was bound, then released)."""
    return f"http://127.0.0.1:{free_port()}"


GatewayFactory = Callable[[dict[str, Any]], Gateway]
FakeFactory = Callable[..., FakeVLLM]


@pytest.fixture
def gateway() -> Iterator[GatewayFactory]:
    started: list[ProxyServer] = []

    def start(data: dict[str, Any]) -> Gateway:
        server = ProxyServer.from_dict(data).start()
        started.append(server)
        return Gateway(server.base_url, server)

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def fakes() -> Iterator[FakeFactory]:
    """Factory of fake engines of the test's own (connection counts start at zero)."""
    started: list[FakeVLLM] = []

    def start(**kwargs: Any) -> FakeVLLM:
        fake = FakeVLLM(**kwargs).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()
