"""A headless worker node's readiness and liveness, without vLLM: real processes holding real TCP
connections to a "head" (a listening socket of the test), read back from /proc (engine.joined),
and the supervisor (proxy.ops.node) run as its own process, reporting to a real sd_notify
socket and stopped by real signals."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.joined import head_ips, joined, parse_address
from engine.procs import group_members

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = {ipaddress.ip_address("127.0.0.1")}
# A stand-in for vLLM's worker: connects to the head, starts a grandchild, then waits.
CHILD = textwrap.dedent(
    """
    import socket, subprocess, sys, time
    conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    subprocess.Popen(["sleep", "300"])
    code = int(sys.argv[2])
    if code:
        sys.exit(code)
    while True:
        time.sleep(1)
    """
)


@pytest.fixture
def head() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(20.0)
    yield server
    server.close()


def until(predicate: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_proc_net_addresses_parse() -> None:
    assert parse_address("0100007F:1F90") == (ipaddress.ip_address("127.0.0.1"), 8080)
    mapped = "0000000000000000FFFF00000100007F:1F90"  # ::ffff:127.0.0.1 in tcp6
    assert parse_address(mapped) == (ipaddress.ip_address("127.0.0.1"), 8080)
    assert parse_address("00000000000000000000000001000000:0050") == (
        ipaddress.ip_address("::1"),
        80,
    )
    assert head_ips("127.0.0.1") == LOOPBACK
    assert head_ips("no-such-host.invalid") == set()


def test_joined_while_the_group_holds_a_connection_to_the_head(head: socket.socket) -> None:
    port = head.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(port), "0"], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        conn, _ = head.accept()
        until(lambda: joined(child.pid, LOOPBACK))
        # Another group, another head address: not joined, though connections exist.
        assert not joined(bystander.pid, LOOPBACK)
        assert not joined(child.pid, {ipaddress.ip_address("10.255.255.1")})
        conn.close()  # the head goes: the child's end is no longer ESTABLISHED
        until(lambda: not joined(child.pid, LOOPBACK))
    finally:
        for proc in (child, bystander):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Supervisor:
    """`proxy.ops.node.supervise` in a process of its own, reporting to `notify`."""

    def __init__(self, tmp_path: Path, port: int, child_exit: int = 0) -> None:
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp_path / "notify"))
        self.notify.settimeout(20.0)
        script = textwrap.dedent(
            f"""
            import sys
            from engine.joined import head_ips
            from engine.launch import LaunchSpec
            from proxy.ops.node import supervise
            argv = [sys.executable, "-c", {CHILD!r}, "{port}", "{child_exit}"]
            spec = LaunchSpec(argv=argv, env={{}}, runtime_dir=None)
            peers = head_ips("127.0.0.1")
            sys.exit(supervise("w", spec, "127.0.0.1", peers, grace=1.0, poll=0.1))
            """
        )
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        match = re.search(r"headless worker \(pid (\d+)\)", first)
        assert match, first
        self.child = int(match.group(1))

    def message(self) -> str:
        return self.notify.recv(4096).decode()

    def finish(self) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=60)
        self.notify.close()
        return self.proc.returncode, out

    def kill(self) -> None:
        """What a failed test leaves: the supervisor and its child's group, killed."""
        for pid, kill in ((self.proc.pid, os.kill), (self.child, os.killpg)):
            with contextlib.suppress(ProcessLookupError):
                kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.notify.close()


@pytest.fixture
def supervisor(tmp_path: Path, head: socket.socket) -> Iterator[Callable[[int], Supervisor]]:
    started: list[Supervisor] = []

    def start(child_exit: int = 0) -> Supervisor:
        started.append(Supervisor(tmp_path, head.getsockname()[1], child_exit))
        return started[-1]

    yield start
    for sup in started:
        sup.kill()


def test_ready_once_joined_and_exits_1_when_the_head_is_gone(
    head: socket.socket, supervisor: Callable[[int], Supervisor]
) -> None:
    sup = supervisor(0)
    assert sup.message() == "STATUS=waiting for the head at 127.0.0.1"
    conn, _ = head.accept()
    assert sup.message() == "READY=1\nSTATUS=joined the head at 127.0.0.1"
    lost = time.monotonic()
    conn.close()
    assert sup.message() == "STATUS=lost the head at 127.0.0.1"
    code, out = sup.finish()
    assert code == 1
    assert time.monotonic() - lost < 15.0
    assert "no connection to the head at 127.0.0.1 for 1 s" in out
    assert group_members(sup.child) == []  # vLLM's stand-in and its grandchild are gone


def test_sigterm_stops_the_whole_group(
    head: socket.socket, supervisor: Callable[[int], Supervisor]
) -> None:
    sup = supervisor(0)
    sup.message()
    conn, _ = head.accept()
    assert sup.message().startswith("READY=1")
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.message() == f"STOPPING=1\nSTATUS=stopping (signal {int(signal.SIGTERM)})"
    code, _ = sup.finish()
    conn.close()
    assert code == 0
    assert group_members(sup.child) == []


def test_a_worker_that_exits_by_itself_passes_its_code_on(
    supervisor: Callable[[int], Supervisor],
) -> None:
    sup = supervisor(3)
    code, out = sup.finish()
    assert code == 3
    assert "vLLM exited with 3" in out
    assert group_members(sup.child) == []
