"""A real systemd (PID 1) booted in namespaces, for testing the appliance's units for real.

The host's PID 1 is not systemd here, but systemd is installed: `guest-init.sh` runs as PID 1 of
new pid/mount/net/uts/ipc namespaces in a cgroup2 subtree of our own, builds a throwaway root
(overlay over /, tmpfs upper) and execs systemd. `systemctl`/`journalctl` reach it through
`nsenter`; HTTP reaches its services from threads that joined its network namespace.
Boot takes ~0.5 s; `close()` powers it off and removes the cgroups (idempotent).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

INIT = Path(__file__).with_name("guest-init.sh")
REPO = Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def unavailable() -> str | None:
    """Why a sandbox cannot boot on this machine, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("/lib/systemd/systemd", "/usr/bin/unshare", "/usr/bin/nsenter", "/usr/bin/script"):
        if not Path(tool).exists():
            return f"{tool} is missing"
    if cgroup2_mount() is None:
        return "no cgroup2 mount"
    return None


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _descendants(pid: int) -> Iterator[int]:
    for child in _children(pid):
        yield child
        yield from _descendants(child)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Sandbox:
    def __init__(self, workdir: Path, name: str | None = None) -> None:
        self.workdir = workdir
        self.name = name or f"vgate-test-{os.getpid()}"
        root = cgroup2_mount()
        assert root is not None
        self.cgroup = root / self.name
        self.pid: int | None = None  # the guest's PID 1, as the host sees it
        self._launcher: subprocess.Popen[bytes] | None = None
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ lifecycle
    def reap_stale(self) -> None:
        """Kill guests left by test runs that died without closing theirs (SIGKILL, timeout).

        Only our own cgroups (`vgate-test-PID`) whose PID is gone: their processes were
        started by such a run, and a guest's PID 1 takes its whole pid namespace with it.
        """
        for stale in self.cgroup.parent.glob("vgate-test-*"):
            owner = stale.name.rsplit("-", 1)[-1]
            if stale == self.cgroup or not owner.isdigit() or Path(f"/proc/{owner}").exists():
                continue
            for procs in stale.rglob("cgroup.procs"):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            deadline = time.monotonic() + 5
            for path in [*sorted(stale.rglob("*"), key=lambda p: -len(p.parts)), stale]:
                while path.is_dir() and time.monotonic() < deadline:
                    try:
                        path.rmdir()
                    except OSError:
                        time.sleep(0.1)

    def boot(self, timeout: float = 30.0) -> Sandbox:
        self.reap_stale()
        (self.cgroup / "supervisor").mkdir(parents=True, exist_ok=True)
        (self.cgroup / "payload").mkdir(exist_ok=True)
        ns = self.workdir / "ns"
        ns.mkdir(parents=True, exist_ok=True)
        console = self.workdir / "console.log"
        inner = (
            "exec unshare --fork --pid --mount --mount-proc --net --uts --ipc "
            f"--propagation private /bin/sh {INIT}"
        )
        env = {**os.environ, "CG": str(self.cgroup), "NS": str(ns), "REPO": str(REPO)}
        env.pop("VGATE_CGNS", None)
        with open(self.workdir / "launcher.log", "wb") as log:
            self._launcher = subprocess.Popen(
                [
                    "setsid",
                    "sh",
                    "-c",
                    'echo 0 > "$1/supervisor/cgroup.procs"; exec script -qfec "$2" "$3"',
                    "sh",
                    str(self.cgroup),
                    inner,
                    str(console),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while self.pid is None:
            self.pid = next(
                (p for p in _descendants(self._launcher.pid) if _comm(p) == "systemd"), None
            )
            if self.pid is None:
                if self._launcher.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the guest systemd did not start: {self.logs()}")
                time.sleep(0.05)
        state = ""
        while state not in ("running", "degraded"):
            state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the guest did not finish booting ({state}): {self.logs()}")
            time.sleep(0.1)
        return self

    def logs(self) -> str:
        parts = []
        for name in ("launcher.log", "console.log"):
            with contextlib.suppress(OSError):
                parts.append((self.workdir / name).read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def close(self) -> None:
        """Power the guest off (SIGKILL after 15 s) and remove its cgroups. Safe to repeat."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        pid = self.pid
        if pid is not None and _comm(pid) == "systemd":
            os.kill(pid, signal.SIGRTMIN + 4)  # systemd: poweroff
            deadline = time.monotonic() + 15
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)  # kills the whole pid namespace
        self.pid = None
        if self._launcher is not None:
            try:
                self._launcher.wait(10)
            except subprocess.TimeoutExpired:
                self._launcher.kill()
                self._launcher.wait(5)
            self._launcher = None
        if self.cgroup.exists():
            for path in sorted(self.cgroup.rglob("*"), key=lambda p: -len(p.parts)):
                if path.is_dir():
                    with contextlib.suppress(OSError):
                        path.rmdir()
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()

    def __enter__(self) -> Sandbox:
        return self.boot()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ commands
    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        namespaces: Sequence[str] = ("-a",),
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the guest (all its namespaces unless told otherwise)."""
        assert self.pid is not None
        cmd = ["nsenter", "-t", str(self.pid), *namespaces, "--", *argv]
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, input=input
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
            )
        return result

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        return self.run(["systemctl", *args], check=check, timeout=timeout).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, since: str | None = None) -> str:
        args = ["journalctl", "--no-pager", "-o", "cat", "-u", unit]
        if since:
            args += ["--since", since]
        return self.run(args, check=False).stdout

    def write(self, path: str, text: str) -> None:
        """Write a file inside the guest (its root is the overlay)."""
        self.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", path], input=text)

    # ------------------------------------------------------------------ network
    def _join_netns(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns(net) failed")
        finally:
            os.close(fd)

    def connect(
        self,
        method: str,
        port: int,
        path: str,
        body: bytes | None = None,
        timeout: float = 30.0,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """A request to 127.0.0.1:port of the guest; the caller reads and closes.

        setns() changes only the calling thread, so the socket is opened on pool threads that
        joined the guest's network namespace (a socket keeps its namespace for life).
        """
        if self._pool is None:
            self._pool = ThreadPoolExecutor(4, initializer=self._join_netns)

        def call() -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            try:
                headers = {"content-type": "application/json"} if body is not None else {}
                conn.request(method, path, body=body, headers=headers)
                return conn, conn.getresponse()
            except BaseException:
                conn.close()
                raise

        return self._pool.submit(call).result(timeout + 5)

    def fetch(
        self, method: str, port: int, path: str, body: bytes | None = None, timeout: float = 30.0
    ) -> tuple[int, bytes]:
        """Status and body of one request; status 0 when nothing answers."""
        try:
            conn, resp = self.connect(method, port, path, body, timeout)
        except OSError:
            return 0, b""
        try:
            return resp.status, resp.read()
        finally:
            conn.close()

    def get_json(self, port: int, path: str) -> tuple[int, Any]:
        status, data = self.fetch("GET", port, path, timeout=5)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, data.decode(errors="replace")
