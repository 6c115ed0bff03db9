"""One worker process as its supervisor sees it: the process, its notify socket, its metrics.

Each worker gets a notify socket of its own in the box directory as its $NOTIFY_SOCKET, so the
supervisor is to its workers the service manager systemd is to it: a worker says READY=1,
RELOADING=1, WATCHDOG=1 and STOPPING=1 exactly as it would to systemd, with the same code
(proxy.ops.sdnotify), and which worker said it is the socket it arrived on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from proxy.core.box import Box
from proxy.core.config import Config
from proxy.runtime import load
from proxy.telemetry.merge import Scrape, parse

log = logging.getLogger("vgate.workers")

SCRAPE_TIMEOUT = 2.0
# The service manager's variables a worker must not see: its manager is the supervisor.
_MANAGER_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


class Worker:
    def __init__(self, box: Box, watchdog: float, on_change: Callable[[], None]) -> None:
        self.box = box
        self.index = box.index
        self.watchdog = watchdog  # seconds without a ping after which it is aborted
        self._on_change = on_change  # something systemd's STATUS= shows changed
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False
        self.status = "starting"
        self.last_ping = 0.0
        self.started = 0.0
        self.last_scrape: Scrape | None = None
        self.reloaded: asyncio.Event | None = None  # set by the READY=1 that ends a reload
        self.aborted: str | None = None  # why the supervisor killed it ("watchdog")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(str(box.notify_socket()))
        self._sock.setblocking(False)
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._on_datagram)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def spawn(self, environ: Mapping[str, str]) -> None:
        env = {k: v for k, v in environ.items() if k not in _MANAGER_ENV}
        env["NOTIFY_SOCKET"] = str(self.box.notify_socket())
        env["WATCHDOG_USEC"] = str(int(self.watchdog * 1e6))
        with contextlib.suppress(FileNotFoundError):
            self.box.admin_socket().unlink()  # a killed worker's, which would refuse binding
        self.ready, self.status, self.last_scrape = False, "starting", None
        self.started = self.last_ping = time.monotonic()
        box = self.box
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy.cli",
            "serve",
            "--config",
            str(box.config_file),
            "--worker",
            f"{box.directory}:{box.index}:{box.count}",
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
        )
        log.info("worker %d started (pid %d)", self.index, self.process.pid)

    def _on_datagram(self) -> None:
        while True:
            try:
                data = self._sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self._handle(data.decode(errors="replace").splitlines())

    def _handle(self, fields: list[str]) -> None:
        self.last_ping = time.monotonic()  # any message shows the worker's loop turns
        values = dict(f.split("=", 1) for f in fields if "=" in f)
        if "STATUS" in values:
            self.status = values["STATUS"]
        if values.get("READY") == "1":
            self.ready = True
            if self.reloaded is not None:
                self.reloaded.set()
        if values.get("STOPPING") == "1":
            self.ready = False
        self._on_change()

    def signal(self, signum: int) -> None:
        if self.alive:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def abort(self, grace: float = 5.0) -> None:
        """SIGABRT (faulthandler prints where its loop is stuck), SIGKILL if that is ignored."""
        self.signal(signal.SIGABRT)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.wait()
                return
        self.signal(signal.SIGKILL)

    async def wait(self) -> int:
        assert self.process is not None
        return await self.process.wait()

    async def scrape(self) -> Scrape | None:
        """The worker's /metrics, over its admin socket; None if it does not answer in time
        (then its last scrape stands for it)."""
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(str(self.box.admin_socket()))
                try:
                    writer.write(b"GET /metrics HTTP/1.1\r\nhost: worker\r\n\r\n")
                    data = await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return None
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return None
        self.last_scrape = parse(body.decode(errors="replace"))
        return self.last_scrape

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def box_directory() -> str:
    """Where the box directory goes: the unit's RuntimeDirectory= (private to the service,
    removed by systemd when it stops), else the temporary directory."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return runtime or os.environ.get("TMPDIR", "/tmp")


def snapshot(data: bytes, target: Path) -> None:
    """Write the config the workers read, whole or not at all."""
    temporary = target.with_suffix(".next")
    temporary.write_bytes(data)
    os.replace(temporary, target)


def validated(source: Path, candidate: Path) -> Config:
    """Copy `source` to `candidate` and load that copy: what is validated is what the workers
    will read, whatever happens to `source` meanwhile."""
    snapshot(source.read_bytes(), candidate)
    return load.load(candidate)
