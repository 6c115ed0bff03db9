"""Hosts on one switch, made of Linux network namespaces, for tests across a real network.

Each host is a network namespace with its own loopback and one interface, `eth0`, whose veth
peer is a port of a bridge in a "switch" namespace of its own. The hosts see each other at
their addresses (10.77.0.x by default) and nothing else: the machine's interfaces, its loopback
and every other session's hosts are out of reach.

Code runs on a host in two ways: a process started with `ip netns exec` (`Host.spawn`), or a
function on a thread that entered the namespace (`Host.call`, `Host.submit`). A socket belongs
to the namespace of the thread that created it, for life, so an in-process client or fake
engine (whose records the test reads directly) really lives on that host.

Faults are made where a network makes them, on the host's switch port or its own interface:
`link_down` (the cable pulled: no carrier, no RST, no ICMP) and `blackhole` (links up, every
packet to and from the host dropped by a `pfifo limit 0` qdisc on both ends of its link: needs
only iproute2, unlike netem or a firewall, and neither end sees anything but silence).

Names carry the creating process's id (`vgtnet-<pid>-<hex>-<host>`): parallel sessions never
collide, and `remove_stale()` deletes what a run that died (its pid gone) left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

PREFIX = "vgtnet-"
ROOT = Path(__file__).resolve().parents[2]
_CLONE_NEWNET = 0x40000000
_STALE = re.compile(rf"^{PREFIX}(\d+)-")
T = TypeVar("T")


class NetnsError(RuntimeError):
    """An `ip`/`tc` command failed (with its stderr), or the machine cannot make namespaces."""


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None (the fixture then still tries for real)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "bridge"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return None


def run(*args: str, check: bool = True) -> str:
    """Run one iproute2 command; its stdout."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(netns: str) -> None:
    """SIGKILL whatever still runs in a namespace of ours (it keeps the namespace alive)."""
    for pid in run("ip", "netns", "pids", netns, check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _namespaces() -> list[str]:
    return [line.split()[0] for line in run("ip", "netns", "list").splitlines() if line.strip()]


def remove_stale() -> list[str]:
    """Delete the namespaces of runs whose process is gone; their names."""
    removed = []
    for name in _namespaces():
        match = _STALE.match(name)
        if match and not _alive(int(match.group(1))):
            _kill_inside(name)
            run("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


def _enter(path: str) -> None:
    """Move the calling thread (only it) into the network namespace at `path`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({path}) failed")
    finally:
        os.close(fd)


class Host:
    """One host: a namespace, an address on the switch, its processes and threads."""

    def __init__(self, network: Network, name: str, address: str) -> None:
        self.network = network
        self.name = name
        self.netns = network.prefix + name
        self.address = address
        self.port = f"p-{name}"  # its port on the switch (interface names: 15 chars at most)
        self._pool: ThreadPoolExecutor | None = None
        self._procs: list[subprocess.Popen[bytes]] = []

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address})"

    # -- code on the host -----------------------------------------------------------------
    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Run `fn` on a thread inside this host's namespace (up to 32 at once)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                32, f"net-{self.name}", initializer=_enter, initargs=(f"/run/netns/{self.netns}",)
            )
        return self._pool.submit(fn, *args, **kwargs)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 60.0, **kwargs: Any) -> T:
        """`submit` and wait for the result."""
        return self.submit(fn, *args, **kwargs).result(timeout)

    def spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        """Start `args` on this host (`ip netns exec`, which execs: the pid is the program's),
        in a session of its own, running this checkout's code; output to `log`."""
        path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        """SIGTERM the process's session, SIGKILL after `grace` seconds."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)

    def wait_listening(
        self,
        address: str,
        port: int,
        within: float = 20.0,
        proc: subprocess.Popen[bytes] | None = None,
        log: Path | None = None,
    ) -> None:
        """Until `address:port` accepts a connection from this host (or `proc` exits)."""
        deadline = time.monotonic() + within
        while True:
            if proc is not None and proc.poll() is not None:
                output = log.read_text(errors="replace") if log else ""
                raise NetnsError(f"{proc.args!r} exited with {proc.returncode}:\n{output}")
            try:
                self.call(socket.create_connection, (address, port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing listens on {address}:{port}") from None
                time.sleep(0.05)

    def close(self) -> None:
        for proc in list(self._procs):
            self.stop(proc, grace=5.0)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class Network:
    """A switch and the hosts on it; `close()` removes every namespace, link and process."""

    def __init__(self, subnet: str = "10.77.0") -> None:
        self.subnet = subnet
        self.prefix = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-"
        self.switch = self.prefix + "switch"
        self.hosts: dict[str, Host] = {}
        try:
            run("ip", "netns", "add", self.switch)
            run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge", "stp_state", "0")
            run("ip", "-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def add(self, name: str, last_octet: int) -> Host:
        """A new host `name` at `<subnet>.<last_octet>/24`, its link up."""
        host = Host(self, name, f"{self.subnet}.{last_octet}")
        self.hosts[name] = host
        ns, sw = host.netns, self.switch
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", sw, "link", "add", host.port, "type", "veth", "peer", "eth0", "netns", ns)
        run("ip", "-n", sw, "link", "set", host.port, "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        return host

    # -- faults ---------------------------------------------------------------------------
    def set_link(self, host: Host, up: bool) -> None:
        """Take the host's switch port down (its eth0 loses carrier) or bring it back; back
        means forwarding again, which the kernel reports up to a second after the command
        (carrier changes go through its link watcher)."""
        run("ip", "-n", self.switch, "link", "set", host.port, "up" if up else "down")
        deadline = time.monotonic() + 5.0
        while up and not self._forwarding(host):
            if time.monotonic() > deadline:
                raise NetnsError(f"{host.port} did not come back")
            time.sleep(0.01)

    def _forwarding(self, host: Host) -> bool:
        port = run("bridge", "-n", self.switch, "link", "show", "dev", host.port)
        eth0 = run("ip", "-n", host.netns, "-o", "link", "show", "dev", "eth0")
        return "state forwarding" in port and "state UP" in eth0

    def set_blackhole(self, host: Host, on: bool) -> None:
        """Drop every packet to and from the host, silently, or stop doing so."""
        for ns, dev in ((self.switch, host.port), (host.netns, "eth0")):
            if on:
                run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "0")
            else:
                run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)

    @contextlib.contextmanager
    def link_down(self, host: Host) -> Iterator[None]:
        self.set_link(host, False)
        try:
            yield
        finally:
            self.set_link(host, True)

    @contextlib.contextmanager
    def blackhole(self, host: Host) -> Iterator[None]:
        self.set_blackhole(host, True)
        try:
            yield
        finally:
            self.set_blackhole(host, False)

    def heal(self) -> None:
        """Every link up, no black hole: what a test that failed midway may have left."""
        for host in self.hosts.values():
            self.set_blackhole(host, False)
            self.set_link(host, True)

    def close(self) -> None:
        """Stop every process and thread of the hosts, then delete every namespace (deleting
        the switch's destroys the bridge and every veth pair with it)."""
        try:
            for host in self.hosts.values():
                host.close()
        finally:
            for name in _namespaces():
                if name.startswith(self.prefix):
                    _kill_inside(name)
                    run("ip", "netns", "del", name, check=False)
