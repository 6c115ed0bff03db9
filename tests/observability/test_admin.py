"""The admin listener over real sockets: what it answers, and that it goes away with the app."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fakes.harness import ProxyServer, proxy_config
from tests.fakes.vllm import FakeVLLM
from tests.observability.helpers import admin_url, scrape, value
from tests.proxy.helpers import CHAT_PATH, RawClient, chat


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


def _listening_ports() -> set[int]:
    """TCP ports this process listens on (its socket inodes, looked up in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in list(fh)[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_admin_is_off_unless_enabled(fake: FakeVLLM) -> None:
    before = _listening_ports()
    with ProxyServer.from_dict(proxy_config(fake.base_url)) as server:
        assert server.app.state.admin is None
        # The only listener the app opened is its main port: no admin port at all.
        assert _listening_ports() - before == {server.port}
    enabled = proxy_config(fake.base_url, admin={"enabled": True, "port": 0})
    with ProxyServer.from_dict(enabled) as server:
        admin = server.app.state.admin
        assert admin is not None
        assert _listening_ports() - before == {server.port, admin.port}  # the check can see one


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_process_figures_and_loop_tasks_follow_open_streams(fake: FakeVLLM) -> None:
    # The proxy runs in this process (on a thread), so /proc/self is its process: the fds it
    # reports are the ones this test can count, clients' and fake's included.
    config = proxy_config(fake.base_url, admin={"enabled": True, "port": 0})
    with ProxyServer.from_dict(config) as server:
        samples = scrape(server)
        fds = value(samples, "process_open_fds")
        assert fds is not None and abs(fds - len(os.listdir("/proc/self/fd"))) <= 3
        assert (value(samples, "process_resident_memory_bytes") or 0) > 10 * 2**20
        assert (value(samples, "process_max_fds") or 0) >= fds
        cpu = value(samples, "process_cpu_seconds_total")
        assert cpu is not None and cpu > 0
        tasks = value(samples, "vgate_event_loop_tasks")
        assert tasks is not None and tasks >= 1

        # Three streams held open: each has its request task, a client socket and an upstream
        # connection (and, in this one process, the fake's and the client's ends too).
        clients = [RawClient(server.base_url) for _ in range(3)]
        body = orjson.dumps(chat(200, stream=True, fake={"token_delay": 0.05}))
        for raw in clients:
            raw.send("POST", CHAT_PATH, body)
            raw.read_until(b"data: ")
        busy = scrape(server)
        assert (value(busy, "vgate_event_loop_tasks") or 0) >= tasks + 3
        assert (value(busy, "process_open_fds") or 0) >= fds + 3 * 3
        for raw in clients:
            raw.close()

        # Gone: the tasks end and every socket of those streams closes.
        deadline = time.monotonic() + 5
        while True:
            after = scrape(server)
            back = value(after, "vgate_event_loop_tasks") == tasks
            if back and (value(after, "process_open_fds") or 0) <= fds:
                break
            assert time.monotonic() < deadline, f"not back to {tasks} tasks and {fds} fds"
            time.sleep(0.05)
        assert (value(after, "process_cpu_seconds_total") or 0) >= cpu
