"""The server's service lifecycle without systemd: sd_notify datagrams, reload, drain.

A unix datagram socket of the test stands in for systemd's $NOTIFY_SOCKET; the proxy is the real
VgateServer on a real port in front of the fake vLLM. (tests/systemd/test_appliance.py checks
the same behaviour under a real systemd.)
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.ops.reload import needs_restart
from proxy.ops.sdnotify import Notifier, watchdog_interval
from proxy.ops.server import VgateServer
from proxy.runtime import load as config_module
from tests.fakes.harness import proxy_config
from tests.fakes.vllm import FakeVLLM
from tests.proxy.helpers import chat


class Manager:
    """The service manager's end of $NOTIFY_SOCKET: collects the datagrams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": str(self.path)}
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))
        return [m for _, m in self.messages]

    def wait_for(self, key: str, value: str | None = None, within: float = 5.0) -> dict[str, str]:
        deadline = time.monotonic() + within
        seen = 0
        while time.monotonic() < deadline:
            msgs = self.drain()
            for msg in msgs[seen:]:
                if key in msg and (value is None or msg[key] == value):
                    return msg
            seen = len(msgs)
        raise AssertionError(f"no {key}={value} in {self.drain()}")


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(tmp_path / "notify")
    yield m
    m.sock.close()


class Served:
    """VgateServer on a background thread (signals are not ours here: call its methods)."""

    def __init__(self, server: VgateServer) -> None:
        self.server = server
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self.sock])

        asyncio.run(main())

    def start(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "did not start"
            time.sleep(0.01)
        return self

    def call(self, coro: Any) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> float:
        started = time.monotonic()
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive()
        self.sock.close()
        return time.monotonic() - started


def write(path: Path, data: dict[str, Any]) -> None:
    lines: list[str] = []

    def table(prefix: str, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in scalars.items())
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    path.write_text("\n".join(lines) + "\n")


def serve(
    fake: FakeVLLM, tmp_path: Path, env: dict[str, str], **sections: dict[str, Any]
) -> Served:
    data = proxy_config(fake.base_url, **sections)
    path = tmp_path / "vgate.toml"
    write(path, data)
    cfg = config_module.load(path)
    return Served(VgateServer(cfg, str(path), Notifier(env))).start()


def test_notifier_is_a_noop_without_a_socket() -> None:
    notifier = Notifier({})
    assert notifier.ready("x") is False
    assert notifier.watchdog_interval is None


def test_notifier_speaks_to_abstract_sockets() -> None:
    name = f"vgate-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.notify("READY=1", "STATUS=hi")
        assert sock.recv(100) == b"READY=1\nSTATUS=hi"
        notifier.close()
    finally:
        sock.close()


def test_watchdog_interval_is_half_and_only_ours() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}, 7) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "7"}, 7) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}, 7) is None
    assert watchdog_interval({}, 7) is None


def test_ready_after_bind_then_watchdog_pings(
    fake: FakeVLLM, manager: Manager, tmp_path: Path
) -> None:
    served = serve(fake, tmp_path, manager.env(watchdog_usec=200_000))
    try:
        msg = manager.wait_for("READY", "1")
        assert msg["STATUS"].startswith("serving 1 models")
        # READY came after the bind: the port answers now, with the app fully started.
        assert httpx.get(served.url + "/health").status_code == 200
        deadline = time.monotonic() + 5
        while len([m for m in manager.drain() if m.get("WATCHDOG") == "1"]) < 4:
            assert time.monotonic() < deadline, "fewer than 4 pings in 5 s"
        pings = [t for t, m in manager.messages if m.get("WATCHDOG") == "1"]
        assert pings[-1] - pings[-4] < 1.0  # every 0.1 s: half of WATCHDOG_USEC
        # A blocked event loop stops the pings (what makes systemd restart the service).
        blocked = threading.Event()

        def block() -> None:
            blocked.set()
            time.sleep(1.0)

        assert served.loop is not None
        served.loop.call_soon_threadsafe(block)
        assert blocked.wait(5)
        before = len(manager.drain())
        time.sleep(0.6)
        assert len(manager.drain()) == before
    finally:
        served.stop()
    assert manager.drain()[-1].get("STOPPING") == "1"


def test_reload_applies_a_good_config_and_refuses_a_bad_one(
    fake: FakeVLLM, manager: Manager, tmp_path: Path
) -> None:
    served = serve(fake, tmp_path, manager.env())
    path = tmp_path / "vgate.toml"
    try:
        with httpx.Client(base_url=served.url, timeout=10) as client:
            with client.stream(
                "POST", "/v1/chat/completions", json=chat(20, True, fake={"token_delay": 0.02})
            ) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")
                data = proxy_config(fake.base_url)
                data["models"]["alias"] = {"upstreams": [fake.base_url], "served_name": "tiny"}
                write(path, data)
                assert served.call(served.server.reload()) is True
                assert manager.wait_for("RELOADING", "1")
                assert manager.wait_for("READY", "1")
                rest = [line for line in lines if line.startswith("data: ")]
            # The stream begun before the reload finished on its old runtime.
            assert rest[-1] == "data: [DONE]"
            ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
            assert ids == ["tiny", "alias"]

            path.write_text("[models.x]\nupstreams = ['ftp://nope']\n")
            assert served.call(served.server.reload()) is False
            assert "reload refused" in manager.drain()[-1]["STATUS"]
            ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
            assert ids == ["tiny", "alias"]
            answer = client.post("/v1/chat/completions", json=chat(3, False) | {"model": "alias"})
            assert answer.status_code == 200
    finally:
        served.stop()


def test_needs_restart_names_listener_and_pool_settings() -> None:
    a = config_module.from_dict(proxy_config("http://127.0.0.1:1"))
    b = config_module.from_dict(
        proxy_config(
            "http://127.0.0.1:1",
            server={"port": 9999, "max_n": 2},
            upstream={"max_connections": 5},
        )
    )
    assert needs_restart(a, b) == ["server.port", "upstream.max_connections"]


def test_drain_lets_a_stream_finish(fake: FakeVLLM, manager: Manager, tmp_path: Path) -> None:
    served = serve(fake, tmp_path, manager.env(), server={"drain_timeout": 5.0})
    with (
        httpx.Client(base_url=served.url, timeout=10) as client,
        client.stream(
            "POST", "/v1/chat/completions", json=chat(30, True, fake={"token_delay": 0.02})
        ) as stream,
    ):
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        stopper = threading.Thread(target=served.stop)
        stopper.start()
        manager.wait_for("STOPPING", "1")
        # Not accepting any more while it drains.
        with pytest.raises(httpx.ConnectError):
            httpx.get(served.url + "/health", timeout=1)
        rest = [line for line in lines if line.startswith("data: ")]
        stopper.join(10)
    assert rest[-1] == "data: [DONE]"
    assert not fake.seen.cancelled


def test_drain_timeout_cancels_streams_upstream(
    fake: FakeVLLM, manager: Manager, tmp_path: Path
) -> None:
    served = serve(fake, tmp_path, manager.env(), server={"drain_timeout": 0.5})
    with (
        httpx.Client(base_url=served.url, timeout=10) as client,
        client.stream(
            "POST", "/v1/chat/completions", json=chat(500, True, fake={"token_delay": 0.02})
        ) as stream,
    ):
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        took: list[float] = []
        stopper = threading.Thread(target=lambda: took.append(served.stop()))
        stopper.start()
        rest = [line for line in lines if line.startswith("data: ")]
        stopper.join(10)
    # An error event, no [DONE]: the client knows the answer is cut short, and why.
    last = json.loads(rest[-1][len("data: ") :])
    assert last["error"]["code"] == "shutting_down"
    assert "data: [DONE]" not in rest
    assert took and took[0] < 3
    # The upstream saw the disconnect (vLLM aborts the generation on it).
    assert fake.wait(lambda r: len(r.cancelled) == 1, 5)
