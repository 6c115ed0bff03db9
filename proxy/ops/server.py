"""Run the app under uvicorn as a service: safe binds, readiness, watchdog, reload, drain.

`VgateServer` is uvicorn's server with the lifecycle a systemd unit needs:
- READY=1 once the app's lifespan has built the client and runtime and the listener is bound;
- WATCHDOG=1 pings from a task on the event loop itself, so a blocked loop stops them;
- SIGHUP reloads the config file (proxy.ops.reload), framed by RELOADING=1 / READY=1;
- SIGTERM drains: stop accepting, let requests finish up to `server.drain_timeout`, then cancel
  what is left (the endpoint ends those streams with an error event and closes the upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import faulthandler
import logging
import os
import signal
import socket
from collections.abc import Coroutine
from typing import Any

import uvicorn

from proxy.core.box import Box
from proxy.core.config import Config
from proxy.http.app import App, create_app
from proxy.http.guard import SHUTDOWN
from proxy.http.protocol import protocol_class
from proxy.ops.reload import Outcome, Reloader
from proxy.ops.sdnotify import Notifier
from proxy.runtime.holder import RuntimeHolder
from proxy.telemetry.logs import dict_config

log = logging.getLogger("vgate.server")

# After the drain deadline, how long cancelled requests get to send their error event and
# close their upstream connection before the client pool is closed under them.
CANCEL_GRACE = 2.0


def uvicorn_config(
    config: Config, app: App | None = None, box: Box | None = None
) -> uvicorn.Config:
    server = config.server
    app = create_app(config, box=box) if app is None else app
    return uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        loop="uvloop",
        # httptools with head/body timeouts and head limits (proxy.http.protocol); no websockets.
        http=protocol_class(server, app.state.metrics.refused),
        ws="none",
        lifespan="on",
        access_log=False,  # one structured line per request comes from vgate itself
        log_level=config.logging.level,
        # JSON lines on stderr for vgate's and uvicorn's loggers: the journal under systemd.
        log_config=dict_config(config.logging, None if box is None else box.index),
        server_header=False,
        date_header=False,
        timeout_keep_alive=int(server.keepalive_timeout),
        timeout_graceful_shutdown=int(server.drain_timeout),
        limit_concurrency=server.max_concurrency,
        proxy_headers=False,
    )


class VgateServer(uvicorn.Server):
    """uvicorn's Server with sd_notify readiness, a loop watchdog, SIGHUP reload and a drain."""

    def __init__(
        self,
        config: Config,
        path: str | None = None,
        notifier: Notifier | None = None,
        box: Box | None = None,
    ) -> None:
        app = create_app(config, box=box)
        super().__init__(uvicorn_config(config, app, box))
        self.notifier = notifier if notifier is not None else Notifier()
        self.holder: RuntimeHolder = app.state.runtime
        self.reloader = Reloader(self.holder, path) if path else None
        self._background: set[asyncio.Task[Any]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started or self.should_exit:
            return
        if self.reloader is not None:
            # Signals reach only the main thread's loop (tests run servers on other threads).
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_hup)
        interval = self.notifier.watchdog_interval
        if interval is not None:
            self._spawn(self._watchdog(interval))
        self.notifier.ready(self._status())

    def _status(self) -> str:
        cfg = self.holder().config
        return f"serving {len(cfg.models)} models on {cfg.server.host}:{cfg.server.port}"

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _watchdog(self, interval: float) -> None:
        # Pinging from the loop (not a thread) is the point: a loop blocked by a stuck handler
        # stops the pings, and systemd kills and restarts the service.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _on_hup(self) -> None:
        if not self.should_exit:
            self._spawn(self.reload())

    async def reload(self) -> bool:
        """Reload the config file; True if applied. The service keeps serving either way."""
        assert self.reloader is not None
        self.notifier.reloading()
        try:
            outcome = await self.reloader.reload()
        except Exception:  # READY=1 must follow RELOADING=1 whatever happened
            log.exception("reload failed; the running config is kept")
            outcome = Outcome(False, problems=["internal error (see the log)"])
        note = "reloaded" if outcome.applied else f"reload refused: {'; '.join(outcome.problems)}"
        self.notifier.ready(f"{self._status()}; {note}")
        return outcome.applied

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's own shutdown cancels late requests without waiting for them and then closes
        # the app (and its client) under them; this one lets them end their responses first.
        timeout = self.holder().config.server.drain_timeout
        busy = len(self.server_state.tasks)
        log.info("shutting down: draining %d requests for up to %.1f s", busy, timeout)
        self.notifier.stopping(f"draining {busy} requests", extend_timeout=timeout + 10)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for server in self.servers:
            server.close()  # stop accepting
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        if not await self._wait_idle(timeout):
            left = list(self.server_state.tasks)
            log.warning("drain timeout: cancelling %d requests still running", len(left))
            for task in left:
                task.cancel(SHUTDOWN)
            if not await self._wait_idle(CANCEL_GRACE):
                log.warning("%d requests did not end after cancel", len(self.server_state.tasks))
        for connection in list(self.server_state.connections):
            connection.shutdown()
        for task in list(self._background):
            task.cancel()
        if not self.force_exit:
            await self.lifespan.shutdown()
        self.notifier.close()

    async def _wait_idle(self, seconds: float) -> bool:
        """Wait until no request task runs; False after `seconds`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.server_state.tasks and not self.force_exit:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True


def serve(config: Config, path: str | None = None, box: Box | None = None) -> None:
    """Run the proxy until SIGTERM/SIGINT; `path` is the config file SIGHUP reloads; `box`:
    as one worker of a supervisor (proxy.ops.workers), on a port the workers share.

    `config` comes from proxy.runtime.load, which has refused a public bind without auth.
    """
    # On a watchdog kill (SIGABRT) the journal then shows where the event loop was stuck.
    faulthandler.enable()
    if box is None:
        VgateServer(config, path).run()
        return
    die_with_parent()
    sock = reuseport_socket(config.server.host, config.server.port)
    VgateServer(config, path, box=box).run(sockets=[sock])


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening socket that the box's other workers bind too: the kernel spreads new
    connections over them (SO_REUSEPORT), rather than waking every worker for each."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def die_with_parent() -> None:
    """A worker whose supervisor is gone (killed with -9) gets SIGTERM and drains, rather than
    serving on without anyone to restart, reload or stop it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the supervisor died before the call
        os.kill(os.getpid(), signal.SIGTERM)
