"""A real proxy (uvicorn, the app, proxy.http.protocol) in front of the session's fake vLLM."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.harness import ProxyServer, proxy_config
from tests.fakes.vllm import FakeVLLM, Seen


def forwarded(fake: FakeVLLM) -> list[Seen]:
    """What the proxy sent upstream on a client's behalf (the engine monitor's probes carry no
    X-Request-ID; every forwarded request does)."""
    with fake._cond:
        return [r for r in fake.seen.requests if "x-request-id" in r.headers]


@pytest.fixture(scope="module")
def server(_shared_fake: FakeVLLM) -> Iterator[ProxyServer]:
    """The proxy with the default server bounds, shared by a module's tests."""
    with ProxyServer.from_dict(proxy_config(_shared_fake.base_url)) as proxy:
        yield proxy
