"""`vgate up`: start, serve, and stop without leaving a single process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine import procs
from tests.fakes.processes import ROOT
from tests.vllm_fixtures import free_port, require_engine_python

UP_TIMEOUT = float(os.environ.get("VGATE_VLLM_START_TIMEOUT", "420"))


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, pgid, state) of a process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[1]), int(fields[2]), fields[0]


def descendants(root: int) -> dict[int, int]:
    """pid -> pgid of every live process below `root` (children in their own sessions too)."""
    parents: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None and st[2] != "Z":
            parents[int(entry)] = (st[0], st[1])
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, pgid) in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = pgid
                frontier.append(pid)
    return found


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[2] != "Z"


def write_config(path: Path, *, python: str, model: str, runtime: Path) -> tuple[Path, int]:
    proxy_port, engine_port = free_port(), free_port()
    path.write_text(
        f"""
[server]
port = {proxy_port}
drain_timeout = 1.0

[upstream]
health_interval = 1.0

[models.tiny]
upstreams = ["engine:tiny"]
served_name = "tiny"

[engines.tiny]
build = "cpu"
python = "{python}"
model = "{model}"
port = {engine_port}
max_model_len = 2048
kv_cache_bytes = 268435456
cpu_cores = "0"
runtime_dir = "{runtime}"
"""
    )
    return path, proxy_port


def start_up(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "up", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture
def reaper() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Whatever a failing test leaves running is stopped, group by group."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        for pgid in set(descendants(proc.pid).values()) | {proc.pid}:
            procs.stop_group(pgid, timeout=5.0)
        proc.wait(timeout=10)


@pytest.mark.vllm
@pytest.mark.slow
def test_up_serves_then_stops_everything_on_sigterm(
    tmp_path: Path, tiny_model_dir: Path, reaper: list[subprocess.Popen[bytes]]
) -> None:
    python = require_engine_python()
    config, proxy_port = write_config(
        tmp_path / "vgate.toml",
        python=str(python),
        model=str(tiny_model_dir),
        runtime=tmp_path / "run",
    )
    log = tmp_path / "up.log"
    proc = start_up(config, log)
    reaper.append(proc)
    base_url = f"http://127.0.0.1:{proxy_port}/v1"
    deadline = time.monotonic() + UP_TIMEOUT
    while f"base_url: {base_url}" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.5)
    text = log.read_text()
    assert "engine tiny: loading" in text and "curl -s" in text

    answer = httpx.post(
        base_url + "/chat/completions",
        json={"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 4
    # Once ready, a line per request (not the proxy's JSON, not vLLM's statistics).
    deadline = time.monotonic() + 10
    while "200 ok  POST /v1/chat/completions  tiny" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
    assert '"logger":"vgate.request"' not in log.read_text()

    tree = descendants(proc.pid)
    groups = set(tree.values())
    # The proxy and the engine each lead a group; vLLM's EngineCore/Worker sit in the engine's.
    assert len(groups) == 2 and proc.pid not in groups
    assert len(tree) >= 4

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()
    left = [pid for pid in tree if alive(pid)]
    left += [pid for pgid in groups for pid in procs.group_members(pgid)]
    assert left == [], f"left behind: {left}"
    assert "vgate up: stopping" in log.read_text()


def test_up_stops_the_rest_and_reports_when_a_child_dies(
    tmp_path: Path, reaper: list[subprocess.Popen[bytes]]
) -> None:
    # `false` is a real engine that fails at once: the supervisor's failure path, with no vLLM.
    (tmp_path / "config.json").write_text("{}")  # a model directory, as far as a check sees
    config, _ = write_config(
        tmp_path / "vgate.toml", python="/bin/false", model=str(tmp_path), runtime=tmp_path / "run"
    )
    log = tmp_path / "up.log"
    proc = start_up(config, log)
    reaper.append(proc)
    assert proc.wait(timeout=60) == 1
    text = log.read_text()
    assert "engine tiny exited with status 1; stopping the rest" in text
    assert "--- last lines of engine tiny ---" in text
    assert descendants(proc.pid) == {}


def test_up_refuses_a_busy_port_at_once(
    tmp_path: Path, reaper: list[subprocess.Popen[bytes]]
) -> None:
    config, proxy_port = write_config(
        tmp_path / "vgate.toml", python="/bin/false", model=str(tmp_path), runtime=tmp_path / "run"
    )
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", proxy_port))
        sock.listen()
        log = tmp_path / "up.log"
        proc = start_up(config, log)
        reaper.append(proc)
        assert proc.wait(timeout=30) == 1
    assert f"proxy port {proxy_port} is already in use" in log.read_text()


def test_up_names_a_missing_engine_venv_or_model_directory_at_once(tmp_path: Path) -> None:
    config, _ = write_config(
        tmp_path / "vgate.toml",
        python=str(tmp_path / ".venv-engine/bin/python"),
        model=str(tmp_path / "models/tiny"),
        runtime=tmp_path / "run",
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "up", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert time.monotonic() - started < 10  # before anything starts, not after a load
    assert f"engines.tiny.python: {tmp_path}/.venv-engine/bin/python does not exist" in done.stderr
    assert "`make engine-venv`" in done.stderr
    assert f"engines.tiny.model: {tmp_path}/models/tiny: no such directory" in done.stderr


def test_engine_run_refuses_what_is_not_a_model_directory(tmp_path: Path) -> None:
    for model, problem in (
        (tmp_path / "empty", "no config.json: not a model directory"),
        (tmp_path / "file", "not a directory"),
    ):
        model.mkdir() if model.name == "empty" else model.write_text("")
        config, _ = write_config(
            tmp_path / "vgate.toml", python="/bin/true", model=str(model), runtime=tmp_path
        )
        done = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "engine", "run", "tiny", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert done.returncode == 2, done.stderr
        assert f"refusing to start: engines.tiny.model: {model}: {problem}" in done.stderr


def test_a_dead_engine_s_root_error_is_shown_under_its_last_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from proxy.ops.up import Child, _print_tail

    child = Child(name="engine tiny", argv=[], stop_timeout=1.0)
    cause = "ValueError: Available memory on node 0 is less than requested memory for kv"
    for line in ["starting", f"(Worker pid=1) ERROR [x.py:1] {cause}", *["  File ..."] * 40]:
        child.tail.append(line)
    child.tail.append("RuntimeError: Engine core initialization failed. See root cause above.")
    _print_tail(child)
    err = capsys.readouterr().err
    assert err.index("--- last lines of engine tiny ---") < err.index("--- the error above them")
    assert cause in err.split("--- the error above them ---")[1]
