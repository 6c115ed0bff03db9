"""`vgate up`: the configured engines and the proxy as one foreground command.

Start every engine (`vgate engine run NAME`, exactly what a systemd unit runs) and the proxy
(`vgate serve`), each in its own process group; show progress while the engines load; once the
proxy's /ready answers 200, print the base URL and a curl example and pass the children's logs
through. Ctrl-C or SIGTERM stops the proxy first (it drains), then the engines, each as a whole
group. If any child dies, the others are stopped and its last log lines explain why.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import httpx

from engine import launch, preflight, procs
from engine.store.pinned import model_path
from proxy.core.config import Config
from proxy.ops.echo import Echo, banner
from proxy.runtime import load

TAIL_LINES = 20
# Kept to find the cause of a death: vLLM's root error is often 30 lines of worker tracebacks
# and shutdown noise above its last line.
KEPT_LINES = 300


@dataclass
class Child:
    """One supervised process group and the tail of its output."""

    name: str
    argv: list[str]
    stop_timeout: float
    health_url: str | None = None  # engines: polled directly to show when loading is done
    proc: asyncio.subprocess.Process | None = None
    tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=KEPT_LINES)
    )
    healthy_after: float | None = None
    echo: bool = False  # show lines once everything is up (proxy.ops.echo picks which)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def children_for(cfg: Config, config_path: str) -> list[Child]:
    """The engines, then the proxy (started last, stopped first)."""
    cli = [sys.executable, "-m", "proxy.cli"]
    out = [
        Child(
            name=f"engine {name}",
            argv=[*cli, "engine", "run", name, "--config", config_path],
            stop_timeout=15.0,
            # A headless worker node serves no HTTP (it reports joining its head on stdout).
            health_url=None if engine.headless else launch.base_url(engine) + "/health",
        )
        for name, engine in cfg.engines.items()
    ]
    out.append(
        Child(
            name="proxy",
            argv=[*cli, "serve", "--config", config_path],
            # The proxy drains open streams on SIGTERM before it exits.
            stop_timeout=cfg.server.drain_timeout + 5.0,
        )
    )
    return out


def proxy_url(cfg: Config) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(cfg.server.host, cfg.server.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.server.port}"


async def up(
    config_path: str,
    *,
    out: TextIO = sys.stdout,
    ready_timeout: float = 900.0,
    shown: Echo | None = None,
) -> int:
    """Run everything until a signal (exit 0) or a failure (exit 1); once ready, `shown`
    picks what of the children's output reaches `out` (default: a line per request, and
    warnings and errors)."""
    echo = shown if shown is not None else Echo()
    cfg = load.load(config_path)
    busy = preflight.busy_ports(cfg)
    if busy:
        for what in busy:
            print(f"vgate up: {what} is already in use", file=sys.stderr)
        return 1
    missing = [
        problem
        for name, e in cfg.engines.items()
        for problem in preflight.problems(name, e, model_path(e.model, e.model_store))
    ]
    for problem in missing:
        print(f"vgate up: {problem}", file=sys.stderr)
    if missing:
        return 1
    children = children_for(cfg, config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    readers: list[asyncio.Task[None]] = []
    try:
        for child in children:
            child.proc = await asyncio.create_subprocess_exec(
                *child.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=procs.die_with_parent(),
                limit=1 << 20,  # vLLM logs its whole config on one line
            )
            readers.append(asyncio.create_task(_read_lines(child, out, echo)))
        return await _supervise(cfg, children, stop, out, ready_timeout)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        # Reverse order: the proxy stops taking requests before its engines go away.
        for child in reversed(children):
            if child.proc is not None:
                await asyncio.to_thread(procs.stop_group, child.pid, child.stop_timeout)
                with contextlib.suppress(ProcessLookupError):
                    await child.proc.wait()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def _supervise(
    cfg: Config, children: list[Child], stop: asyncio.Event, out: TextIO, ready_timeout: float
) -> int:
    started = time.monotonic()
    base = proxy_url(cfg)
    progress = _Progress(out)
    async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
        while True:
            dead = _first_dead(children)
            if dead is not None:
                progress.clear()
                return _report_death(dead)
            if stop.is_set():
                progress.clear()
                print("vgate up: stopping", file=out, flush=True)
                return 0
            elapsed = time.monotonic() - started
            for child in children:
                if (
                    child.health_url
                    and child.healthy_after is None
                    and await _ok(client, child.health_url)
                ):
                    child.healthy_after = elapsed
            if await _ok(client, base + "/ready"):
                break
            if elapsed > ready_timeout:
                progress.clear()
                print(f"vgate up: not ready after {ready_timeout:.0f} s", file=sys.stderr)
                for child in children:
                    _print_tail(child)
                return 1
            progress.show(_status_line(children, elapsed))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

        progress.clear()
        _print_banner(cfg, base, children, time.monotonic() - started, out)
        for child in children:
            child.echo = True
        while not stop.is_set():
            dead = _first_dead(children)
            if dead is not None:
                return _report_death(dead)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    print("vgate up: stopping", file=out, flush=True)
    return 0


async def _read_lines(child: Child, out: TextIO, echo: Echo) -> None:
    assert child.proc is not None and child.proc.stdout is not None
    stream = child.proc.stdout
    while True:
        try:
            raw = await stream.readline()
        except ValueError:  # a line longer than the limit: keep its first part
            raw = await stream.read(1 << 20)
        if not raw:
            return
        line = raw.decode(errors="replace").rstrip()
        if not line:
            continue
        child.tail.append(line)
        if child.echo:
            shown = echo.line(child.name, line)
            if shown is not None:
                print(shown, file=out, flush=True)


async def _ok(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await client.get(url)).status_code == 200
    except httpx.HTTPError:
        return False


def _first_dead(children: list[Child]) -> Child | None:
    for child in children:
        if child.proc is not None and child.proc.returncode is not None:
            return child
    return None


def _report_death(child: Child) -> int:
    assert child.proc is not None
    print(
        f"vgate up: {child.name} exited with status {child.proc.returncode}; stopping the rest",
        file=sys.stderr,
    )
    _print_tail(child)
    return 1


def _print_tail(child: Child) -> None:
    lines = list(child.tail)
    cause = next((line for line in reversed(lines) if _CAUSE.search(line)), None)
    print(f"--- last lines of {child.name} ---", file=sys.stderr)
    for line in lines[-TAIL_LINES:]:
        print(f"  {line}", file=sys.stderr)
    if cause is not None and cause not in lines[-TAIL_LINES:]:
        print(f"--- the error above them ---\n  {cause}", file=sys.stderr)
    sys.stderr.flush()


# The line a Python process dies of: `ValueError: ...`, `torch.OutOfMemoryError: ...`; not the
# generic "Engine core initialization failed" wrapper vLLM adds after it.
_CAUSE = re.compile(r"\b(?!RuntimeError: Engine core)[A-Za-z_.]*(Error|Exception): ")


def _status_line(children: list[Child], elapsed: float) -> str:
    parts = []
    for child in children:
        if child.health_url is None:
            continue
        if child.healthy_after is not None:
            parts.append(f"{child.name}: healthy after {child.healthy_after:.0f}s")
        else:
            last = child.tail[-1] if child.tail else "starting"
            parts.append(f"{child.name}: loading {elapsed:.0f}s | {last}")
    return "; ".join(parts) or f"waiting for the proxy {elapsed:.0f}s"


class _Progress:
    """One self-overwriting status line on a terminal; a line per change elsewhere (logs, CI)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last = ""
        self.shown = False
        self.printed_at = 0.0

    def show(self, text: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            self.out.write("\r\x1b[K" + text[:width])
            self.shown = True
            self.out.flush()
            return
        # Without a terminal, print only when something beyond the counter changes (or every 10s).
        key = text.split("|", 1)[-1]
        now = time.monotonic()
        if key != self.last or now - self.printed_at >= 10:
            print(text, file=self.out, flush=True)
            self.last, self.printed_at = key, now

    def clear(self) -> None:
        if self.tty and self.shown:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.shown = False


def _print_banner(
    cfg: Config, base: str, children: list[Child], elapsed: float, out: TextIO
) -> None:
    print(banner(cfg, base, elapsed), file=out, flush=True)
