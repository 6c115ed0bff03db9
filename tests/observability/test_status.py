"""`vgate status` against a real proxy (in front of the fake engine) over real sockets.

The proxy runs from a config dict on ports it picked; the command reads a config file written
with those ports, as an operator's `vgate status --config /etc/vgate/vgate.toml` does.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy.cli.main import main
from tests.fakes.harness import ProxyServer
from tests.fakes.processes import ROOT
from tests.fakes.vllm import FakeVLLM
from tests.proxy.helpers import CHAT_PATH, RawClient, chat

Run = Callable[..., tuple[int, str, str]]


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for a test config: tables of strings, numbers, booleans and lists."""
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, dict)]
    lines = [f"[{prefix}]"] if prefix and scalars else []
    lines += [f"{k} = {json.dumps(v)}" for k, v in scalars]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", _toml(v, f"{prefix}.{k}" if prefix else k)]
    return "\n".join(lines)


def config(fake_url: str, **sections: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "server": {"drain_timeout": 1.0},
        "upstream": {"health_interval": 0.1, "metrics_interval": 0.1},
        "admin": {"enabled": True, "port": 0},
        "logging": {"requests": False},
        "models": {"tiny": {"upstreams": [fake_url]}},
    }
    for name, table in sections.items():
        data[name] = {**data.get(name, {}), **table}
    return data


def engine_config(fake: FakeVLLM) -> dict[str, Any]:
    """Model `tiny` on `engine:tiny`, an engine vgate would launch, played by the fake."""
    data = config("engine:tiny")
    data["engines"] = {
        "tiny": {"model": "/m", "build": "cpu", "port": fake.port, "served_name": "tiny"}
    }
    return data


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], tuple[ProxyServer, Path]]]:
    """Start a proxy from a config dict; returns it and a config file naming its listeners."""
    started: list[ProxyServer] = []

    def start(data: dict[str, Any]) -> tuple[ProxyServer, Path]:
        server = ProxyServer.from_dict(data).start()
        started.append(server)
        on_disk = {**data, "server": {**data["server"], "port": server.port}}
        admin = server.app.state.admin
        if admin is not None:
            on_disk["admin"] = {**data["admin"], "port": admin.port}
        path = tmp_path / f"vgate-{len(started)}.toml"
        path.write_text(_toml(on_disk) + "\n")
        return server, path

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    def run_status(path: Path, *args: str) -> tuple[int, str, str]:
        code = main(["status", "--config", str(path), *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run_status


def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _ready(server: ProxyServer) -> bool:
    return httpx.get(server.base_url + "/ready", timeout=5).status_code == 200


def _row(out: str, *starts: str) -> list[str]:
    """The cells of the first line whose cells begin with `starts`."""
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[: len(starts)] == list(starts):
            return cells
    raise AssertionError(f"no row {starts} in:\n{out}")


def test_shows_models_upstreams_engines_load_and_the_last_minute(
    fake: FakeVLLM, served: Callable[..., tuple[ProxyServer, Path]], run: Run
) -> None:
    fake.kv_cache_usage = 0.42
    server, path = served(engine_config(fake))
    until(lambda: _ready(server))
    for _ in range(4):
        body = chat(stream=False)
        assert httpx.post(server.base_url + CHAT_PATH, json=body, timeout=10).status_code == 200
    for _ in range(3):
        body = chat(stream=True, fake={"first_byte_delay": 0.1})
        assert httpx.post(server.base_url + CHAT_PATH, json=body, timeout=10).status_code == 200

    with RawClient(server.base_url) as held:
        held.post_json(CHAT_PATH, chat(stream=True, fake={"hang_after_events": 1}))
        held.read_until(b"data: ")
        # The engine's own count comes from its /metrics, scraped every 0.1 s.
        until(lambda: run(path, "--json")[1].count('"running":1') == 1)

        code, out, err = run(path)
        assert (code, err) == (0, "")
        assert "\x1b[" not in out  # not a terminal: no colour, no screen clearing
        assert out.splitlines()[0].startswith(f"vgate http://127.0.0.1:{server.port}  ready  ")
        model = _row(out, "tiny", "ready")
        assert model[2:4] == ["1", "0"]  # in flight, queued
        assert float(model[4]) > 0
        assert model[5].endswith(" ms") and model[6].endswith(" ms")
        assert _row(out, "tiny", "engine:tiny")[2:6] == ["healthy", "closed", "1", "warmed up"]
        engine = _row(out, "tiny", f"http://127.0.0.1:{fake.port}")
        assert engine[2:] == ["tiny", "42.0%", "1", "0", "2048"]
        assert re.search(r"requests finished in the last \d+ s", out)

        code, out, _ = run(path, "--json")
        data = orjson.loads(out)

    assert code == 0
    assert data["state"] == "ready" and data["ready"] is True and data["admin_error"] is None
    (tiny,) = data["models"]
    assert tiny["requests"] == 7
    assert tiny["requests_per_second"] == pytest.approx(7 / data["window_seconds"])
    # The streams' first bytes came after 0.1 s (read off buckets 10 % wide).
    assert 0.09 <= tiny["ttft_p50"] <= tiny["ttft_p95"] < 0.5
    assert (tiny["in_flight"], tiny["queued"]) == (1, 0)
    (upstream,) = tiny["upstreams"]
    assert upstream == {
        "upstream": "engine:tiny",
        "healthy": True,
        "error": None,
        "warmed_up": True,
        "breaker": "closed",
        "breaker_retry_in": 0.0,
        "in_flight": 1,
    }
    assert data["engines"] == [
        {
            "engine": "tiny",
            "upstream": "engine:tiny",
            "url": f"http://127.0.0.1:{fake.port}",
            "models": ["tiny"],
            "kv_cache_usage": 0.42,
            "running": 1,
            "waiting": 0,
            "max_model_len": 2048,
        }
    ]
    assert set(data) == {
        "state", "proxy", "admin", "time", "ready", "window_seconds", "admin_error", "models",
        "engines",
    }  # fmt: skip

    # The held stream ended (cancelled by its client): counted in the window too.
    until(lambda: orjson.loads(run(path, "--json")[1])["models"][0]["requests"] == 8)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_proxy_says_so_and_exits_2(tmp_path: Path, run: Run) -> None:
    port = _free_port()
    path = tmp_path / "vgate.toml"
    path.write_text(f'[server]\nport = {port}\n[models.tiny]\nupstreams = ["http://127.0.0.1:1"]\n')
    code, out, err = run(path)
    url = f"http://127.0.0.1:{port}/ready"
    assert (code, out) == (2, "")
    assert err == f"vgate status: cannot reach {url}: connection refused — is vgate running?\n"
    code, out, _ = run(path, "--json")
    assert code == 2
    assert orjson.loads(out) == {"state": "unreachable", "error": err[len("vgate status: ") : -1]}
    # Watching, it keeps trying (a proxy restarting comes back on screen), each frame saying so.
    code, out, err = run(path, "--watch", "0.1", "--count", "2")
    assert (code, err) == (2, "")
    frames = out.split("\n\nvgate ")
    assert len(frames) == 2 and all(f"{port}  unreachable  " in f for f in frames)
    assert all(f"cannot reach {url}: connection refused" in f for f in frames)


def test_something_listening_that_is_not_vgate_is_unreachable(
    fake: FakeVLLM, tmp_path: Path, run: Run
) -> None:
    path = tmp_path / "vgate.toml"  # the fake engine's port: it has no /ready
    path.write_text(f'[server]\nport = {fake.port}\n[models.t]\nupstreams = ["http://h:1"]\n')
    code, _, err = run(path)
    assert code == 2
    assert "answered 404, not as vgate's /ready does" in err


def test_degraded_not_ready_and_an_open_breaker_exit_1(
    fake: FakeVLLM, served: Callable[..., tuple[ProxyServer, Path]], run: Run
) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    # One of two upstreams down: served (/ready 200), but not everything is ready.
    server, path = served(
        config(fake.base_url, models={"tiny": {"upstreams": [fake.base_url, dead]}})
    )
    until(lambda: _ready(server) and '"healthy":false' in run(path, "--json")[1])
    code, out, _ = run(path)
    assert code == 1
    assert "  degraded  " in out.splitlines()[0]
    assert _row(out, "tiny", "ready")
    assert _row(out, "tiny", dead)[2:4] == ["unhealthy", "closed"]
    assert "cannot connect" in _row(out, "tiny", dead)[5]

    # The only upstream's breaker opens on a failure: the model is not ready.
    breaker = {"breaker": {"fail_max": 1, "reset_timeout": 60}, "retry": {"attempts": 1}}
    server, path = served(config(fake.base_url, resilience=breaker))
    until(lambda: _ready(server))
    body = chat(fake={"status": 500, "body": "boom"})
    assert httpx.post(server.base_url + CHAT_PATH, json=body, timeout=10).status_code == 502
    code, out, _ = run(path)
    assert code == 1
    assert "  not ready  " in out.splitlines()[0]
    assert _row(out, "tiny", "not ready")
    row = _row(out, "tiny", fake.base_url)
    assert row[2:4] == ["healthy", "open"]
    assert re.fullmatch(r"breaker retries in (59|60) s", row[5])


def test_without_the_admin_listener_shows_what_ready_knows(
    fake: FakeVLLM, served: Callable[..., tuple[ProxyServer, Path]], run: Run
) -> None:
    fake.kv_cache_usage = 0.25
    server, path = served(config(fake.base_url, admin={"enabled": False}))
    until(lambda: _ready(server) and "25.0%" in run(path)[1])
    code, out, _ = run(path)
    assert code == 0
    assert _row(out, "tiny", "ready")[4:] == ["-", "-", "-"]
    assert _row(out, fake.base_url, "tiny")[2:] == ["25.0%", "-", "-", "-"]
    assert "no metrics: the admin listener is off ([admin] enabled = false)" in out
    # Configured, but not answering where the config says: noted, the rest still shown.
    port = _free_port()
    text = path.read_text()
    assert "enabled = false\nport = 0\n" in text
    path.write_text(text.replace("enabled = false\nport = 0", f"enabled = true\nport = {port}"))
    code, out, _ = run(path)
    assert code == 0 and _row(out, "tiny", "ready")
    assert f"no metrics: cannot reach http://127.0.0.1:{port}/metrics: connection refused" in out


def test_watch_count_and_json_give_one_line_a_refresh(
    fake: FakeVLLM, served: Callable[..., tuple[ProxyServer, Path]], run: Run
) -> None:
    server, path = served(config(fake.base_url))
    until(lambda: _ready(server))
    started = time.monotonic()
    code, out, _ = run(path, "--watch", "0.2", "--count", "3", "--json")
    assert code == 0
    frames = [orjson.loads(line) for line in out.splitlines()]
    assert [f["state"] for f in frames] == ["ready"] * 3
    assert frames[0]["time"] < frames[1]["time"] < frames[2]["time"]
    assert time.monotonic() - started >= 0.4


class Terminal:
    """The master side of a pty: the frames `--watch` drew on it, colour codes removed."""

    CLEAR = "\x1b[H\x1b[2J"
    COLOUR = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, master: int) -> None:
        self.master = master
        self.raw = ""
        self.taken = 0  # frames `next` returned

    def next(self, within: float = 10.0) -> str:
        """The next whole frame drawn (between two clears) after the last one returned."""
        deadline = time.monotonic() + within
        while True:
            whole = self.raw.split(self.CLEAR)[1:-1]
            if len(whole) > self.taken:
                self.taken += 1
                return self.COLOUR.sub("", whole[self.taken - 1])
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no frame {self.taken + 1}: {self.raw[-2000:]!r}"
            if select.select([self.master], [], [], remaining)[0]:
                self.raw += os.read(self.master, 65536).decode(errors="replace")


def test_watch_on_a_terminal_redraws_in_colour_until_interrupted(
    fake: FakeVLLM, served: Callable[..., tuple[ProxyServer, Path]]
) -> None:
    server, path = served(config(fake.base_url))
    until(lambda: _ready(server))
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"TERM": "xterm"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    args = [sys.executable, "-m", "proxy.cli", "status", "--config", str(path), "--watch", "0.2"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    try:
        term = Terminal(master)
        first, second = term.next(), term.next()
        assert "\x1b[32mready\x1b[0m" in term.raw  # in colour, on a terminal
        assert "every 0.2 s, Ctrl-C to stop" in first
        assert _row(second, "tiny", "ready")[2] == "0"
        # A stream opens: a later frame shows it in flight.
        with RawClient(server.base_url) as held:
            held.post_json(CHAT_PATH, chat(stream=True, fake={"hang_after_events": 1}))
            held.read_until(b"data: ")
            until(lambda: _row(term.next(), "tiny", "ready")[2] == "1")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
