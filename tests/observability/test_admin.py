"""The admin listener over real sockets: what it answers, and that it goes away with the app."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.fakes.harness import ProxyServer, proxy_config
from tests.fakes.vllm import FakeVLLM
from tests.observability.helpers import admin_url


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_admin_answers_metrics_only_and_stops_with_the_app(fake: FakeVLLM) -> None:
    config = proxy_config(fake.base_url, admin={"enabled": True, "port": 0})
    with ProxyServer.from_dict(config) as server:
        url = admin_url(server)
        port = server.app.state.admin.port
        assert httpx.get(url + "/metrics?x=1").text.startswith("# HELP vgate_")
        assert httpx.get(url + "/health").text == "ok\n"
        assert httpx.get(url + "/v1/models").status_code == 404
        assert httpx.post(url + "/metrics").status_code == 405
        head = httpx.head(url + "/metrics")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) > 100
        assert _raw(port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        huge = b"GET /metrics HTTP/1.1\r\nx: " + b"a" * 20_000 + b"\r\n\r\n"
        assert _raw(port, huge).startswith(b"HTTP/1.1 400 ")
        # The main port does not serve metrics.
        assert httpx.get(server.base_url + "/metrics").status_code == 404
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/metrics")


def test_admin_is_off_unless_enabled(fake: FakeVLLM) -> None:
    with ProxyServer.from_dict(proxy_config(fake.base_url)) as server:
        assert server.app.state.admin is None
