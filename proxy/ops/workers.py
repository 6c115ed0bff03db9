"""`[server] workers = N`: one supervisor, N `vgate serve` workers accepting on one port.

The supervisor is what systemd sees (the unit's main process). It owns the box directory
(proxy.core.box), starts the workers and is their service manager (proxy.ops.worker):
- READY=1 to systemd once every worker listens;
- the watchdog covers every worker: a worker that stops pinging is aborted (SIGABRT, so
  faulthandler shows where it was stuck) and restarted; the supervisor pings systemd from its
  own loop;
- a worker that exits is logged, counted (`vgate_worker_restarts_total`) and restarted after a
  backoff; one that keeps crashing stops the box (exit 1: systemd's Restart= takes over);
- SIGHUP validates the file, snapshots it into the box directory and has every worker reload
  that snapshot (so a worker restarted later reads the same), then READY=1;
- SIGTERM drains every worker (each as `vgate serve` alone does), SIGKILL after the deadline;
- the admin listener is the supervisor's: one /metrics for the box (proxy.telemetry.merge).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.config
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from proxy.core.binder import ConfigError
from proxy.core.box import SECRET_FILE, Box
from proxy.core.config import Config
from proxy.ops.reload import needs_restart
from proxy.ops.sdnotify import Notifier
from proxy.ops.server import CANCEL_GRACE
from proxy.ops.worker import Worker, box_directory, describe_exit, snapshot, validated
from proxy.telemetry.admin import AdminServer
from proxy.telemetry.logs import dict_config
from proxy.telemetry.merge import Merger, parse
from proxy.telemetry.registry import Registry

log = logging.getLogger("vgate.workers")

STARTUP_TIMEOUT = 120.0  # for every worker to say READY=1 (it probes engines for <= 2 s)
RELOAD_TIMEOUT = 60.0
SCRAPE_INTERVAL = 5.0  # what a killed worker counted since its last scrape is lost
DEFAULT_WATCHDOG = 20.0  # a worker's, when systemd asks no watchdog of the supervisor
BACKOFF = (0.5, 10.0)  # first and longest pause before restarting a crashed worker
CRASH_LOOP = (5, 60.0)  # this many restarts of one worker within this many seconds: give up


class Supervisor:
    def __init__(self, config: Config, path: str, notifier: Notifier | None = None) -> None:
        self.config = config
        self.path = path
        self.notifier = notifier if notifier is not None else Notifier()
        self.count = config.server.worker_count()
        interval = self.notifier.watchdog_interval
        self.watchdog = 2 * interval if interval is not None else DEFAULT_WATCHDOG
        self.workers: list[Worker] = []
        self.merger = Merger()
        self._stopping = asyncio.Event()
        self._exit_code = 0
        self._reload_lock = asyncio.Lock()
        self._restarts: dict[int, list[float]] = {}
        self._ready = -1
        self._started = False  # READY=1 sent: from then on STATUS= follows the workers
        self._tasks: set[asyncio.Task[None]] = set()
        self._metrics = Registry()
        self._ready_gauge = self._metrics.gauge(
            "vgate_workers_ready", "Worker processes that are serving."
        )
        self._metrics.gauge("vgate_workers", "Worker processes configured.").labels().set(
            self.count
        )
        self._restart_counter = self._metrics.counter(
            "vgate_worker_restarts_total", "Worker processes restarted, by reason.", ("reason",)
        )
        for reason in ("crashed", "watchdog"):
            self._restart_counter.labels(reason)  # at 0 from the start: increase() sees the first
        self._metrics.gauge(
            "process_start_time_seconds", "Start time (unix seconds)."
        ).labels().set(time.time())

    def run(self) -> int:
        logging.config.dictConfig(dict_config(self.config.logging))
        directory = Path(tempfile.mkdtemp(prefix="vgate-workers-", dir=box_directory()))
        try:
            secret = secrets.token_bytes(32)
            fd = os.open(directory / SECRET_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secret)
            snapshot(Path(self.path).read_bytes(), directory / "config.toml")
            return asyncio.run(self.main(directory, secret))
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    async def main(self, directory: Path, secret: bytes) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn_task(self.reload()))
        admin = None
        if self.config.admin.enabled:
            server = self.config.admin
            admin = AdminServer(server.host, server.port, self.render)
        for index in range(self.count):
            worker = Worker(Box(directory, index, self.count, secret), self.watchdog, self._update)
            self.workers.append(worker)
        try:
            if admin is not None:
                await admin.start()
            if not await self._start():
                self._exit_code = 0 if self._stopping.is_set() else 1
            else:
                self.notifier.ready(self._status())
                self._started = True
                for task in (self._watch(), self._scrape_loop(), self._ping_systemd()):
                    self._spawn_task(task)
                for worker in self.workers:
                    self._spawn_task(self._keep(worker))
                await self._stopping.wait()
        finally:
            await self._shutdown()
            if admin is not None:
                await admin.stop()
            for worker in self.workers:
                worker.close()
        return self._exit_code

    def _spawn_task(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self) -> bool:
        """Start every worker; True once all are ready, False (logged) if one fails first."""
        for worker in self.workers:
            await worker.spawn(os.environ)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not all(w.ready for w in self.workers):
            for worker in self.workers:
                if not worker.alive:
                    code = await worker.wait()
                    log.error(
                        "worker %d %s before it was ready: stopping",
                        worker.index,
                        describe_exit(code),
                    )
                    return False
            if time.monotonic() > deadline or self._stopping.is_set():
                if not self._stopping.is_set():
                    log.error("workers not ready after %.0f s: stopping", STARTUP_TIMEOUT)
                return False
            await asyncio.sleep(0.05)
        log.info("%d workers serving on port %d", self.count, self.config.server.port)
        return True

    def _status(self) -> str:
        server = self.config.server
        ready = sum(w.ready for w in self.workers)
        return (
            f"serving {len(self.config.models)} models on {server.host}:{server.port}; "
            f"{ready}/{self.count} workers ready"
        )

    def _update(self) -> None:
        ready = sum(w.ready for w in self.workers)
        if ready != self._ready:
            self._ready = ready
            self._ready_gauge.labels().set(ready)
            if self._started:
                self.notifier.notify(f"STATUS={self._status()}")

    async def _keep(self, worker: Worker) -> None:
        """Restart `worker` whenever it exits, until the box stops."""
        while True:
            code = await worker.wait()
            if self._stopping.is_set():
                return
            reason, worker.aborted = worker.aborted or "crashed", None
            if not await self._restart(worker, describe_exit(code), reason):
                return

    async def _watch(self) -> None:
        """Abort workers whose watchdog lapsed (`_keep` then restarts them)."""
        while True:
            await asyncio.sleep(min(1.0, self.watchdog / 4))
            now = time.monotonic()
            for worker in self.workers:
                late = now - worker.last_ping
                if worker.alive and worker.ready and late > worker.watchdog:
                    log.error(
                        "worker %d (pid %s) missed its watchdog (no ping for %.1f s): aborting",
                        worker.index,
                        worker.pid,
                        late,
                    )
                    worker.ready = False
                    worker.aborted = "watchdog"
                    self._spawn_task(worker.abort())

    async def _restart(self, worker: Worker, how: str, reason: str) -> bool:
        """Restart `worker` after a backoff; False when it keeps crashing (the box stops)."""
        if worker.last_scrape is not None:
            self.merger.retire(worker.last_scrape)  # its counts stay in the box's totals
        worker.last_scrape = None
        worker.ready = False
        self._update()
        now = time.monotonic()
        recent = [t for t in self._restarts.get(worker.index, []) if now - t < CRASH_LOOP[1]]
        self._restarts[worker.index] = [*recent, now]
        if len(recent) + 1 > CRASH_LOOP[0]:
            log.critical(
                "worker %d %s, %d times in %.0f s: stopping the box",
                worker.index,
                how,
                len(recent) + 1,
                CRASH_LOOP[1],
            )
            self._exit_code = 1
            self._stopping.set()
            return False
        pause = min(BACKOFF[0] * 2 ** len(recent), BACKOFF[1])
        log.error("worker %d %s: restarting it in %.1f s", worker.index, how, pause)
        self._restart_counter.labels(reason).inc()
        await asyncio.sleep(pause)
        if self._stopping.is_set():
            return False
        await worker.spawn(os.environ)
        return True

    async def _scrape_loop(self) -> None:
        while True:
            await asyncio.sleep(SCRAPE_INTERVAL)
            await asyncio.gather(*(w.scrape() for w in self.workers if w.alive))

    async def _ping_systemd(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def render(self) -> bytes:
        """The box's /metrics: every live worker scraped now (the last scrape of one that does
        not answer), merged with the retired counts and the supervisor's own."""
        live = [w for w in self.workers if w.alive]
        fresh = await asyncio.gather(*(w.scrape() for w in live))
        scrapes = [s if s is not None else w.last_scrape for s, w in zip(fresh, live, strict=False)]
        own = parse(self._metrics.render().decode())
        return self.merger.merge([s for s in scrapes if s is not None], own)

    async def reload(self) -> bool:
        """SIGHUP: every worker reloads the same validated file, or none does."""
        async with self._reload_lock:
            self.notifier.reloading()
            directory = self.workers[0].box.directory
            candidate = directory / "config.candidate.toml"
            try:
                config = validated(Path(self.path), candidate)
            except (ConfigError, OSError) as exc:
                problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
                log.error("reload refused, the running config is kept: %s", "; ".join(problems))
                self.notifier.ready(f"{self._status()}; reload refused")
                return False
            restart = needs_restart(self.config, config)
            if restart:
                log.warning("reload: changed settings that need a restart: %s", ", ".join(restart))
            os.replace(candidate, directory / "config.toml")
            live = [w for w in self.workers if w.alive]
            for worker in live:
                worker.reloaded = asyncio.Event()
                worker.signal(signal.SIGHUP)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RELOAD_TIMEOUT):
                    await asyncio.gather(*(w.reloaded.wait() for w in live if w.reloaded))
            refused = [w.index for w in live if "refused" in w.status]
            for worker in live:
                worker.reloaded = None
            self.config = config
            note = f"reload refused by workers {refused}" if refused else "reloaded"
            log.info("reload: %s from %s", note, self.path)
            self.notifier.ready(f"{self._status()}; {note}")
            return not refused

    async def _shutdown(self) -> None:
        timeout = self.config.server.drain_timeout
        self.notifier.stopping("draining workers", extend_timeout=timeout + CANCEL_GRACE + 10)
        for task in list(self._tasks):
            task.cancel()
        live = [w for w in self.workers if w.alive]
        log.info("shutting down: draining %d workers for up to %.1f s", len(live), timeout)
        for worker in live:
            worker.signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout + CANCEL_GRACE + 5):
                await asyncio.gather(*(w.wait() for w in live))
        for worker in live:
            if worker.alive:
                log.warning("worker %d did not stop in time: killing it", worker.index)
                worker.signal(signal.SIGKILL)
                await worker.wait()
        self.notifier.close()
