"""`vgate-engine-worker@NAME` under a real systemd: activating while its head is missing, active
once joined, restarted into the head's next group when the head goes.

Installed by `vgate systemd install` in a booted guest systemd (tests/systemd/sandbox.py), as
in test_appliance.py. The engine venv holds a stand-in for `vllm serve --headless` that does
what vLLM's headless workers do on the network: connect to the head's rendezvous
(`--master-addr`/`--master-port`) and stay, also after the head is gone. The head is a socket
of the test, listening in the guest's network namespace.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.systemd.sandbox import Sandbox, unavailable
from tests.systemd.test_appliance import install, until, wheelhouse

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.slow,
    pytest.mark.skipif(unavailable() is not None, reason=f"sandbox: {unavailable()}"),
]
UNIT = "vgate-engine-worker@big-1.service"
DROPIN = "/etc/systemd/system/vgate-engine-worker@.service.d/test.conf"
HEAD_PORT = 29555
FAKE_WORKER = """\
import argparse
import socket
import time

p = argparse.ArgumentParser()
p.add_argument("--master-addr")
p.add_argument("--master-port", type=int)
p.add_argument("--headless", action="store_true")
args, _ = p.parse_known_args()
assert args.headless
time.sleep(1)  # importing vLLM
while True:
    try:
        conn = socket.create_connection((args.master_addr, args.master_port))
        break
    except OSError:
        time.sleep(0.2)
print("connected to the head", flush=True)
while True:  # like vLLM's headless workers: still here when the head is gone
    time.sleep(60)
"""
CONFIG = f"""
[models.big]
upstreams = ["http://127.0.0.1:9"]

[engines.big-1]
python = "/opt/vgate-engine/bin/python"
model = "/var/lib/vgate-engine/models/big"
tensor_parallel_size = 2
nnodes = 2
node_rank = 1
headless = true
master_addr = "127.0.0.1"
master_port = {HEAD_PORT}
"""


@pytest.fixture(scope="module")
def sb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    wheels = wheelhouse()
    workdir = tmp_path_factory.mktemp("systemd-worker")
    box = Sandbox(workdir, name=f"vgate-test-worker-{time.time_ns()}")
    try:
        box.boot()
        site = install(box, wheels)
        for pkg in ("vllm", "vllm/entrypoints", "vllm/entrypoints/cli"):
            box.write(f"{site}/{pkg}/__init__.py", "")
        box.write(f"{site}/vllm/entrypoints/cli/main.py", FAKE_WORKER)
        box.write("/etc/vgate/vgate.toml", CONFIG)
        # A model directory the engine can see (`vgate engine run` checks it before vLLM).
        box.write("/var/lib/vgate-engine/models/big/config.json", "{}")
        box.run(["chmod", "-R", "a+rX", "/var/lib/vgate-engine/models"])
        # Restart at once (not after 10 s): the test waits out the 15 s grace only.
        box.write(DROPIN, "[Service]\nRestartSec=1s\n")
        box.systemctl("daemon-reload")
        yield box
    finally:
        box.close()


class Head:
    """A listening socket in the guest's network namespace, accepting on a thread."""

    def __init__(self, sb: Sandbox) -> None:
        self.pool = ThreadPoolExecutor(2, initializer=sb._join_netns)
        self.server = self.pool.submit(
            socket.create_server, ("127.0.0.1", HEAD_PORT), reuse_port=True
        ).result(10)
        self.server.settimeout(60.0)

    def accept(self) -> socket.socket:
        conn, _ = self.server.accept()
        return conn

    def close(self) -> None:
        self.server.close()
        self.pool.shutdown()


def state(sb: Sandbox) -> dict[str, str]:
    return sb.show(UNIT, "ActiveState", "SubState", "StatusText", "NRestarts", "MainPID")


def test_worker_waits_joins_and_rejoins_after_its_head_goes(sb: Sandbox) -> None:
    check = sb.run(["/opt/vgate/bin/vgate", "check-config", "/etc/vgate/vgate.toml"])
    assert "OK" in check.stdout
    sb.systemctl("start", "--no-block", UNIT)
    # No head yet: starting, not failed, and saying why.
    waiting = until(
        lambda: (s := state(sb))["StatusText"].startswith("waiting for the head") and s,
        30,
        "the waiting status",
    )
    assert waiting["ActiveState"] == "activating", waiting
    time.sleep(3)
    assert state(sb)["ActiveState"] == "activating"

    head = Head(sb)
    try:
        conn = head.accept()
        joined = until(lambda: (s := state(sb))["ActiveState"] == "active" and s, 30, "active")
        assert joined["StatusText"] == "joined the head at 127.0.0.1"
        assert joined["NRestarts"] == "0"
        # vgate is the main process; vLLM (the stand-in) runs as its child in the unit.
        main = sb.run(["ps", "-o", "args=", "-p", joined["MainPID"]]).stdout
        assert "vgate engine run big-1" in main

        conn.close()  # the head goes; the stand-in stays, as vLLM's workers do
        lost = time.monotonic()
        conn = head.accept()  # ...and the restarted worker joins the head's next group
        took = time.monotonic() - lost
        rejoined = until(
            lambda: (s := state(sb))["ActiveState"] == "active" and s["NRestarts"] == "1" and s,
            30,
            "active again after a restart",
        )
        assert rejoined["MainPID"] != joined["MainPID"]
        assert 15 <= took < 45, took
        journal = sb.journal(UNIT)
        assert "no connection to the head at 127.0.0.1 for 15 s" in journal
        assert journal.count("joined the head at 127.0.0.1 in") == 2
        conn.close()
    finally:
        head.close()
    sb.systemctl("stop", UNIT)
    assert state(sb)["ActiveState"] == "inactive"
    procs = sb.run(["ps", "-u", "vgate-engine", "-o", "pid="], check=False).stdout.split()
    assert procs == []  # the stand-in went with the unit
