"""An engine that answers completions with exact bytes: hostile framing, protocol violations.

`tests.fakes.vllm` speaks correct HTTP with faults in its timing and content; this one writes
whatever its script says, so a test can put any byte sequence on the proxy's upstream
connection. GET requests (the proxy's health probes) get an empty 200, so the upstream is
healthy. It runs on a background thread with its own loop, like the fake vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# What to write for the n-th completion request (0-based, over all connections): one write per
# item; a float item is a pause of that many seconds; None closes the connection.
Script = Callable[[int], Sequence[bytes | float | None]]
HEALTHY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


@dataclass
class Completion:
    """One completion request as the engine read it."""

    connection: int
    head: bytes
    body: bytes


@dataclass
class ScriptedEngine:
    script: Script
    completions: list[Completion] = field(default_factory=list)
    connections: int = 0  # connections that sent a completion request
    closed: int = 0  # of those, connections that ended (either side closing)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ScriptedEngine:
        ready = threading.Event()
        loop = self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            server = loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
            self._server = server
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="scripted-engine", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("the scripted engine did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A task of its own that _close() can cancel: the accept callback must end normally.
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        await asyncio.wait({task})
        self._tasks.discard(task)

    def __enter__(self) -> ScriptedEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index: int | None = None
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                if head.startswith(b"GET "):
                    writer.write(HEALTHY)
                    continue
                with self._lock:
                    if index is None:
                        index = self.connections
                        self.connections += 1
                    n = len(self.completions)
                    self.completions.append(Completion(index, head, body))
                for step in self.script(n):
                    if step is None:
                        return
                    if isinstance(step, float):
                        await asyncio.sleep(step)
                        continue
                    writer.write(step)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            if index is not None:
                with self._lock:
                    self.closed += 1
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
