"""Shared fixtures: a fake vLLM upstream and the real proxy under uvicorn, both on real sockets."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fakes.harness import ProxyServer, proxy_config
from tests.fakes.vllm import FakeVLLM

# One real vLLM (and one redis-server) per session for every directory: a fixture imported into
# two conftest files would be two fixtures, and two engines on the shared core.
pytest_plugins = ["tests.vllm_fixtures", "tests.redis_fixtures"]


@pytest.fixture(scope="session")
def _shared_fake() -> Iterator[FakeVLLM]:
    with FakeVLLM() as fake:
        yield fake


@pytest.fixture
def fake(_shared_fake: FakeVLLM) -> FakeVLLM:
    """A fake vLLM on a loopback port (shared by the session, its record reset per test)."""
    _shared_fake.reset()
    return _shared_fake


@pytest.fixture
def fresh_fake() -> Iterator[FakeVLLM]:
    """A fake vLLM of the test's own (for connection counts and per-server settings)."""
    with FakeVLLM() as fake:
        yield fake


ProxyFactory = Callable[..., str]


@pytest.fixture
def proxy(fake: FakeVLLM) -> Iterator[ProxyFactory]:
    """Factory: `proxy(target=None, config=None, **sections) -> base_url`.

    Starts the real app under uvicorn on a free loopback port, in front of `target` (default:
    the `fake` fixture), with a config dict built by `proxy_config` unless `config` is given.
    Every proxy started is stopped at teardown.
    """
    started: list[ProxyServer] = []
    # The proxy, the fake and the test's client are three busy threads of one process: at the
    # default 5 ms GIL switch interval each hop between them can wait that long.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)

    def start(
        target: FakeVLLM | str | None = None,
        config: dict[str, Any] | None = None,
        **sections: dict[str, Any],
    ) -> str:
        if config is None:
            target = target if target is not None else fake
            url = target.base_url if isinstance(target, FakeVLLM) else target
            config = proxy_config(url, **sections)
        server = ProxyServer.from_dict(config).start()
        started.append(server)
        return server.base_url

    try:
        yield start
    finally:
        for server in started:
            server.stop()
        sys.setswitchinterval(interval)


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect at each test's end: an unclosed socket's ResourceWarning (an error here) then
    fails the test that leaked it, not whichever later test the collector happens to run in."""
    yield
    gc.collect()
