"""`[server] workers = 2`: the supervisor and its workers as `vgate serve` runs them.

Each test starts the real command as a process (a supervisor and two worker processes on one
port) in front of the fake engine, and talks to it over fresh connections, which the kernel
spreads over the two workers (SO_REUSEPORT).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from proxy.telemetry.merge import parse
from tests.fakes.harness import proxy_config
from tests.fakes.processes import ROOT, service
from tests.fakes.vllm import FakeVLLM
from tests.proxy.helpers import chat, events
from tests.systemd.test_lifecycle import Manager, write


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Box:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, admin: int, log: Path) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.admin = f"http://127.0.0.1:{admin}/metrics"
        self.log = log

    def metrics(self) -> dict[str, float]:
        """Every series of the box's /metrics, by its text (name and labels)."""
        scrape = parse(httpx.get(self.admin, timeout=5).text)
        return {key: value for key, (_, value) in scrape.series.items()}

    def total(self, name: str) -> float:
        return sum(v for k, v in self.metrics().items() if k.split("{")[0] == name)

    def wait(self, name: str, value: float, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while self.total(name) != value:
            assert time.monotonic() < deadline, f"{name} != {value}: {self.total(name)}"
            time.sleep(0.1)

    def workers(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [int(pid) for pid in children.split()]

    def records(self) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def post(self, body: dict[str, Any], path: str = "/v1/chat/completions") -> httpx.Response:
        # A client of its own: a new connection, which the kernel may give either worker.
        return httpx.post(self.url + path, json=body, timeout=30)


def after(manager: Manager, mark: int, key: str, within: float = 20.0) -> dict[str, str]:
    """The first datagram with `key` among those after the first `mark` ones."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = [m for m in manager.drain()[mark:] if key in m]
        if found:
            return found[0]
    raise AssertionError(f"no {key} after {mark}: {manager.drain()}")


@contextmanager
def box(
    tmp_path: Path, fake: FakeVLLM, env: dict[str, str] | None = None, **sections: Any
) -> Iterator[Box]:
    port, admin = _port(), _port()
    sections["server"] = {
        "workers": 2,
        "port": port,
        "drain_timeout": 3,
        **sections.get("server", {}),
    }
    data = proxy_config(fake.base_url, admin={"enabled": True, "port": admin}, **sections)
    config, log = tmp_path / "vgate.toml", tmp_path / "vgate.log"
    write(config, data)
    command = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)]
    with service(command, port, log, environ=env) as proc:
        served = Box(proc, port, admin, log)
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if served.total("vgate_workers_ready") == 2:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield served


def test_both_workers_serve_and_a_rate_limit_is_one_for_the_box(
    tmp_path: Path, fake: FakeVLLM
) -> None:
    limited = {"order": ["ratelimit"], "ratelimit": {"overall": {"requests_per_minute": 10}}}
    with box(tmp_path, fake, policies=limited) as served:
        statuses = [served.post(chat()).status_code for _ in range(30)]
        served.proc.send_signal(signal.SIGTERM)
        served.proc.wait(15)
    assert statuses.count(200) == 10  # not 10 per worker
    assert statuses.count(429) == 20
    answered = [r for r in served.records() if r.get("msg") == "request" or "status" in r]
    workers = {r["worker"] for r in answered if "worker" in r and "status" in r}
    assert workers == {0, 1}, answered[:3]


def test_metrics_are_the_box_and_never_go_back_when_a_worker_is_killed(
    tmp_path: Path, fake: FakeVLLM
) -> None:
    with box(tmp_path, fake) as served:
        for _ in range(20):
            assert served.post(chat()).status_code == 200
        assert served.total("vgate_requests_total") == 20
        assert served.total("vgate_upstream_attempts_total") == 20
        assert served.total("vgate_workers") == 2
        victim = served.workers()[0]
        os.kill(victim, signal.SIGKILL)
        seen = [served.total("vgate_requests_total")]
        served.wait("vgate_worker_restarts_total", 1)
        served.wait("vgate_workers_ready", 2)
        seen.append(served.total("vgate_requests_total"))
        assert victim not in served.workers()
        for _ in range(10):
            assert served.post(chat()).status_code == 200
        seen.append(served.total("vgate_requests_total"))
        # The killed worker's 20-odd requests stay counted: a counter never goes back.
        assert seen == [20, 20, 30]
        metrics = served.metrics()
        assert metrics['vgate_worker_restarts_total{reason="crashed"}'] == 1
        # Gauges of state: the worst any worker sees; of what the engine reports: one value.
        assert metrics['vgate_model_ready{model="tiny"}'] == 1
    errors = [r["msg"] for r in served.records() if r["level"] == "error"]
    assert any("killed by SIGKILL: restarting it" in m for m in errors), errors


def test_ready_once_every_worker_listens_and_the_watchdog_covers_each(
    tmp_path: Path, fake: FakeVLLM
) -> None:
    manager = Manager(tmp_path / "notify")
    try:
        with box(tmp_path, fake, env=manager.env(watchdog_usec=2_000_000)) as served:
            ready = manager.wait_for("READY", "1")
            assert "2/2 workers ready" in ready["STATUS"]
            manager.wait_for("WATCHDOG", "1", within=3)
            stuck = served.workers()[1]
            os.kill(stuck, signal.SIGSTOP)  # its loop stops: no more pings
            served.wait("vgate_worker_restarts_total", 1, within=20)
            served.wait("vgate_workers_ready", 2)
            assert stuck not in served.workers()
            manager.wait_for("WATCHDOG", "1", within=3)  # the supervisor kept pinging
            assert served.post(chat()).status_code == 200
        logged = [r["msg"] for r in served.records()]
        assert any("missed its watchdog" in m for m in logged), logged
    finally:
        manager.sock.close()


def test_sighup_reloads_every_worker_with_the_same_validated_file(
    tmp_path: Path, fake: FakeVLLM
) -> None:
    manager = Manager(tmp_path / "notify")
    try:
        with box(tmp_path, fake, env=manager.env()) as served:
            manager.wait_for("READY", "1")
            config = tmp_path / "vgate.toml"
            config.write_text(
                config.read_text() + f'\n[models.other]\nupstreams = ["{fake.base_url}"]\n'
            )
            mark = len(manager.drain())
            served.proc.send_signal(signal.SIGHUP)
            assert after(manager, mark, "RELOADING")["RELOADING"] == "1"
            assert after(manager, mark, "READY")["STATUS"].endswith("; reloaded")
            for _ in range(12):
                names = [m["id"] for m in httpx.get(served.url + "/v1/models").json()["data"]]
                assert "other" in names  # whichever worker answered
            config.write_text(config.read_text() + "\n[server]\nport = 0\n")  # invalid
            mark = len(manager.drain())
            served.proc.send_signal(signal.SIGHUP)
            assert after(manager, mark, "READY")["STATUS"].endswith("; reload refused")
            for _ in range(12):
                names = [m["id"] for m in httpx.get(served.url + "/v1/models").json()["data"]]
                assert "other" in names
            # A worker started after the refused reload reads the config that was applied.
            os.kill(served.workers()[0], signal.SIGKILL)
            served.wait("vgate_worker_restarts_total", 1)
            served.wait("vgate_workers_ready", 2)
            for _ in range(12):
                assert served.post(chat(), "/v1/chat/completions").status_code == 200
                names = [m["id"] for m in httpx.get(served.url + "/v1/models").json()["data"]]
                assert "other" in names
    finally:
        manager.sock.close()


def test_sigterm_drains_every_worker(tmp_path: Path, fake: FakeVLLM) -> None:
    manager = Manager(tmp_path / "notify")
    try:
        with box(tmp_path, fake, env=manager.env()) as served:
            manager.wait_for("READY", "1")
            body = chat(tokens=10, stream=True, fake={"token_delay": 0.15})
            with httpx.stream(
                "POST", served.url + "/v1/chat/completions", json=body, timeout=30
            ) as answer:
                chunks = answer.iter_raw()
                rest = next(chunks)
                served.proc.send_signal(signal.SIGTERM)
                rest += b"".join(chunks)
            assert served.proc.wait(20) == 0
        assert events(rest)[-1] == b"[DONE]"
        assert len(events(rest)) == 12  # role, 10 tokens, [DONE]: the stream was not cut
        manager.wait_for("STOPPING", "1")
    finally:
        manager.sock.close()


def test_probes_after_a_breaker_reset_are_at_most_one_per_worker(
    tmp_path: Path, fake: FakeVLLM
) -> None:
    # Breakers are per worker (documented): when the engine still fails after reset_timeout,
    # each worker lets one probe through, so the engine sees at most `workers` of them.
    fake.defaults = {"status": 503}
    resilience = {
        "breaker": {"fail_max": 1, "reset_timeout": 2.0},
        "retry": {"attempts": 1},
    }
    with box(tmp_path, fake, resilience=resilience) as served:
        for _ in range(40):
            served.post(chat())
            if served.total("vgate_upstream_breaker_trips_total") == 2:
                break
        assert served.total("vgate_upstream_breaker_trips_total") == 2  # both opened
        time.sleep(2.2)
        before = len(fake.seen.requests)
        statuses = [served.post(chat()).status_code for _ in range(20)]
        probes = [r for r in fake.seen.requests[before:] if r.path == "/v1/chat/completions"]
        assert 1 <= len(probes) <= 2, statuses
        assert statuses.count(503) >= 18


def test_a_port_in_use_stops_the_box_with_the_reason(tmp_path: Path, fake: FakeVLLM) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        config = tmp_path / "vgate.toml"
        write(config, proxy_config(fake.base_url, server={"workers": 2, "port": port}))
        done = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        )
    finally:
        taken.close()
    assert done.returncode == 1
    err = done.stderr.decode()
    assert "address already in use" in err.lower(), err
    assert "before it was ready: stopping" in err
