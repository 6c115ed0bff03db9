"""server.max_connections_per_client: one address cannot take all of the listener.

Clients are told apart by their IP address (IPv6: by /64), here by binding client sockets to
different loopback addresses (127.0.0.1, 127.0.0.2, ...: all this host).
"""

from __future__ import annotations

import time

import pytest

from proxy.core.binder import ConfigError
from proxy.http.limits import client_key
from proxy.ops.reload import RESTART_ONLY
from proxy.runtime.load import from_dict
from proxy.telemetry.metrics import ProxyMetrics
from tests.conftest import ProxyFactory
from tests.fakes.harness import ProxyServer, proxy_config
from tests.fakes.vllm import FakeVLLM
from tests.security.conftest import forwarded
from tests.security.raw import Conn, chat_body, request

BODY = chat_body()
SLOW = chat_body(fake={"first_byte_delay": 0.4})


def port_of(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1])


def refused_count(server: ProxyServer) -> float:
    metrics: ProxyMetrics = server.app.state.metrics
    child = metrics.http_refused._children.get(("client_connections",))
    return child.value if child is not None else 0.0


def test_connections_above_the_per_client_limit_get_an_openai_503(
    fake: FakeVLLM, proxy: ProxyFactory
) -> None:
    port = port_of(proxy(server={"max_connections_per_client": 2}))
    with Conn(port) as a, Conn(port) as b, Conn(port) as c:
        c.send(request(BODY))
        response = c.response()
        assert response.status == 503
        assert response.error()["code"] == "overloaded"
        assert response.headers["retry-after"] == "1"
        assert response.headers["connection"] == "close"
        assert c.closed()
        for conn in (a, b):  # the first two are served, request after request
            for _ in range(2):
                conn.send(request(BODY))
                assert conn.response().status == 200
    assert len(forwarded(fake)) == 4


def served_within(port: int, seconds: float = 3.0) -> None:
    """A new connection is served within `seconds` (the server sees a client's close a moment
    after it: until then the closed connection may still hold its place)."""
    deadline = time.monotonic() + seconds
    while True:
        with Conn(port) as conn:
            conn.send(request(BODY))
            status = conn.response().status
        if status == 200:
            return
        assert status == 503 and time.monotonic() < deadline, status
        time.sleep(0.02)


def test_a_closed_connection_frees_its_place(fake: FakeVLLM, proxy: ProxyFactory) -> None:
    port = port_of(proxy(server={"max_connections_per_client": 1}))
    for _ in range(3):
        served_within(port)
    time.sleep(0.1)
    with Conn(port) as first:
        first.send(request(BODY))
        assert first.response().status == 200
        with Conn(port) as second:
            second.send(request(BODY))
            assert second.response().status == 503
    served_within(port)


def test_other_addresses_are_counted_apart_and_refused_ones_leave_max_concurrency(
    fake: FakeVLLM, proxy: ProxyFactory
) -> None:
    # One address opens many connections: only one counts, for it and for max_concurrency;
    # another address still gets served.
    base = proxy(server={"max_connections_per_client": 1, "max_concurrency": 2})
    port = port_of(base)
    hog = [Conn(port, source="127.0.0.1") for _ in range(5)]
    try:
        other = Conn(port, source="127.0.0.2")
        with other:
            hog[0].send(request(SLOW))
            other.send(request(SLOW))
            assert other.response().status == 200
            assert hog[0].response().status == 200
        for conn in hog[1:]:
            conn.send(request(BODY))
            assert conn.response().status == 503
    finally:
        for conn in hog:
            conn.close()


def test_refusals_are_counted(fake: FakeVLLM) -> None:
    config = proxy_config(fake.base_url, server={"max_connections_per_client": 1})
    with ProxyServer.from_dict(config) as server:
        before = refused_count(server)
        with Conn(server.port) as a, Conn(server.port) as b:
            a.send(request(BODY))
            assert a.response().status == 200
            b.send(request(BODY))
            assert b.response().status == 503
        assert refused_count(server) - before == 1
        text = server.app.state.metrics.registry.render().decode()
        assert 'vgate_http_refused_total{reason="client_connections"} 1' in text


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("10.0.0.1", "10.0.0.1", True),
        ("10.0.0.1", "10.0.0.2", False),
        ("2001:db8::1", "2001:db8::ffff:1", True),  # one /64: one subscriber
        ("2001:db8::1", "2001:db8:0:1::1", False),
        ("::ffff:10.0.0.1", "10.0.0.1", True),  # IPv4 mapped into IPv6 is that IPv4 address
        ("fe80::1%eth0", "fe80::2%eth1", True),
        ("::1", "::1", True),
    ],
)
def test_client_keys(a: str, b: str, same: bool) -> None:
    assert (client_key(a) == client_key(b)) is same


def test_the_setting_is_checked_and_needs_a_restart() -> None:
    models = {"tiny": {"upstreams": ["http://127.0.0.1:9"]}}
    for bad in (0, -1, "2"):
        with pytest.raises(ConfigError) as info:
            from_dict({"server": {"max_connections_per_client": bad}, "models": models})
        assert any("server.max_connections_per_client" in p for p in info.value.problems)
    with pytest.raises(ConfigError) as info:
        from_dict(
            {"server": {"max_connections_per_client": 5, "max_concurrency": 4}, "models": models}
        )
    assert any("max_connections_per_client" in p for p in info.value.problems)
    cfg = from_dict({"models": models})
    assert cfg.server.max_connections_per_client is None  # unset: see the README
    assert "max_connections_per_client" in RESTART_ONLY["server"]
