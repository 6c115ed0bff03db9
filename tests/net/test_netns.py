"""The network harness itself: hosts reach each other only over the switch, its faults are
silent (no RST, no ICMP: a connect times out), and nothing it made outlives it."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.net import netns

pytestmark = pytest.mark.net


@pytest.fixture(scope="module")
def pair(network: netns.Network) -> Iterator[tuple[netns.Host, netns.Host]]:
    """Two hosts; `b` listens on port 7000 (a thread inside b's namespace holds the socket)."""
    a, b = network.add("a", 1), network.add("b", 2)
    listener = b.call(socket.create_server, (b.address, 7000))
    try:
        yield a, b
    finally:
        listener.close()


def connect(host: netns.Host, address: str, port: int, timeout: float = 0.5) -> str:
    """How a connection attempt from `host` ends: "ok", "refused" or "timeout"."""

    def attempt() -> str:
        try:
            socket.create_connection((address, port), timeout=timeout).close()
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"
        return "ok"

    return host.call(attempt)


def carrier(host: netns.Host) -> bool:
    return "NO-CARRIER" not in netns.run("ip", "-n", host.netns, "link", "show", "eth0")


def test_hosts_reach_each_other_over_the_switch_and_nothing_else(
    pair: tuple[netns.Host, netns.Host],
) -> None:
    a, b = pair
    assert connect(a, b.address, 7000) == "ok"
    assert connect(a, b.address, 7001) == "refused"  # a real host answers: RST, at once
    # The machine's own loopback is not theirs: a listener in the test process is out of reach.
    with socket.create_server(("127.0.0.1", 0)) as outside:
        assert connect(a, "127.0.0.1", outside.getsockname()[1]) == "refused"


def test_link_down_and_blackhole_are_silent_and_undone(
    network: netns.Network, pair: tuple[netns.Host, netns.Host]
) -> None:
    a, b = pair
    with network.link_down(b):
        assert not carrier(b)
        assert connect(a, b.address, 7000) == "timeout"
        assert connect(a, b.address, 7001) == "timeout"  # not even a refusal gets through
    assert carrier(b)
    assert connect(a, b.address, 7000) == "ok"
    with network.blackhole(b):
        assert carrier(b)  # the link is up; the packets just vanish
        assert connect(a, b.address, 7000) == "timeout"
        assert connect(b, a.address, 7000) == "timeout"  # both ways
    assert connect(a, b.address, 7000) == "ok"


def test_close_removes_every_namespace_and_process(netns_usable: None, tmp_path: Path) -> None:
    net = netns.Network()
    host = net.add("h", 1)
    proc = host.spawn([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log")
    assert any(n.startswith(net.prefix) for n in netns.run("ip", "netns", "list").split())
    net.close()
    assert proc.poll() is not None
    assert not any(n.startswith(net.prefix) for n in netns.run("ip", "netns", "list").split())


def test_stale_namespaces_of_a_dead_run_are_removed_and_live_ones_kept(netns_usable: None) -> None:
    dead = 2**22 + 1  # above the kernel's largest pid_max: no process has it
    stale = f"{netns.PREFIX}{dead}-000000-h"
    netns.run("ip", "netns", "add", stale)
    live = netns.Network()
    try:
        removed = netns.remove_stale()
        names = netns.run("ip", "netns", "list")
        assert stale in removed and stale not in names
        assert live.switch in names
    finally:
        live.close()
        netns.run("ip", "netns", "del", stale, check=False)
