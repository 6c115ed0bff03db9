"""Scenario 34: heads and bodies trickled in are cut off at the header / body timeout.

The proxy here has header_timeout = body_timeout = 1 s. Deadlines count from the start of the
head (the connection's opening, for its first request) or of the body, never from the last
byte, so a client sending a byte now and then cannot stretch them.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import threading
import time
from collections.abc import Iterator

import orjson
import pytest

from tests.fakes.harness import ProxyServer, proxy_config
from tests.fakes.vllm import FakeVLLM
from tests.security.conftest import forwarded
from tests.security.raw import Conn, chat_body, chunked, request

TIMEOUT = 1.0
BODY = chat_body()


@pytest.fixture(scope="module")
def server(_shared_fake: FakeVLLM) -> Iterator[ProxyServer]:
    config = proxy_config(
        _shared_fake.base_url, server={"header_timeout": TIMEOUT, "body_timeout": TIMEOUT}
    )
    with ProxyServer.from_dict(config) as proxy:
        yield proxy


async def trickle(port: int, first: bytes, slow: bytes, every: float = 0.2) -> tuple[bytes, float]:
    """Send `first` at once, then `slow` a byte every `every` s until the server closes.

    Returns what the server sent and the seconds from sending `first` to the server's close.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    writer.write(first)

    async def send_slowly() -> None:
        with contextlib.suppress(OSError):
            for i in range(len(slow)):
                await writer.drain()
                await asyncio.sleep(every)
                writer.write(slow[i : i + 1])

    sender = asyncio.create_task(send_slowly())
    try:
        received = await asyncio.wait_for(reader.read(-1), 10)  # to EOF
        return received, time.monotonic() - start
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def timed_out(received: bytes) -> dict[str, object]:
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), received[:300]
    assert b"connection: close" in head.lower()
    error: dict[str, object] = orjson.loads(body)["error"]
    assert error["code"] == "request_timeout"
    return error


async def test_connection_that_sends_nothing_is_closed(server: ProxyServer) -> None:
    received, elapsed = await trickle(server.port, b"", b"")
    assert received == b""  # nothing was asked: closed quietly
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 2


async def test_head_trickled_is_cut_at_the_header_timeout(
    fake: FakeVLLM, server: ProxyServer
) -> None:
    data = request(BODY)
    received, elapsed = await trickle(server.port, data[:5], data[5:])
    assert "headers" in str(timed_out(received)["message"])
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 2
    assert forwarded(fake) == []


async def test_endless_blank_lines_do_not_keep_a_connection(server: ProxyServer) -> None:
    received, elapsed = await trickle(server.port, b"\r\n", b"\r\n" * 100, every=0.1)
    assert received == b""
    assert elapsed < TIMEOUT + 2


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_trickled_is_cut_at_the_body_timeout(
    fake: FakeVLLM, server: ProxyServer, framing: str
) -> None:
    if framing == "chunked":
        data = request(chunked(BODY, 3), length=False, headers=[("Transfer-Encoding", "chunked")])
    else:
        data = request(BODY)
    head = data.index(b"\r\n\r\n") + 4
    received, elapsed = await trickle(server.port, data[: head + 2], data[head + 2 :])
    assert "body" in str(timed_out(received)["message"])
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 2
    assert forwarded(fake) == []


async def test_next_head_on_a_keepalive_connection_is_timed_from_its_first_byte(
    fake: FakeVLLM, server: ProxyServer
) -> None:
    # The second head starts 0.7 s after the first answer and trickles on: it is cut 1 s after
    # its first byte, not 1 s after the connection opened (nor never).
    loop = asyncio.get_running_loop()

    def first_then_slow() -> tuple[int, float]:
        with Conn(server.port) as conn:
            conn.send(request(BODY))
            status = conn.response().status
            time.sleep(0.7)
            conn.send(b"POST")
            started = time.monotonic()
            for byte in b" /v1/chat/completions HTTP/1.1\r\n":
                try:
                    conn.send(bytes([byte]))
                except OSError:
                    break
                # The answer (then our side's end) arrives at the deadline; the server keeps
                # reading after it (a lingering close), so only reading tells.
                if conn.eof or select.select([conn.sock], [], [], 0)[0]:
                    break
                time.sleep(0.1)
            assert conn.closed(within=5)
            assert conn.buffer.startswith(b"HTTP/1.1 408 "), conn.buffer[:200]
            return status, time.monotonic() - started

    status, elapsed = await loop.run_in_executor(None, first_then_slow)
    assert status == 200
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 2
    assert len(forwarded(fake)) == 1


async def test_slow_but_timely_request_is_served(fake: FakeVLLM, server: ProxyServer) -> None:
    data = request(BODY)
    head = data.index(b"\r\n\r\n") + 4
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        # Head in three pieces over 0.6 s, then the body in two pieces over 0.6 s more: each
        # part within its own 1 s, the whole beyond it.
        for piece in (
            data[:10],
            data[10:30],
            data[30:head],
            data[head : head + 8],
            data[head + 8 :],
        ):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.3)
        line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    assert line.startswith(b"HTTP/1.1 200 "), line
    assert len(forwarded(fake)) == 1


async def test_pipelined_body_waiting_on_a_long_answer_is_not_cut(
    fake: FakeVLLM, server: ProxyServer
) -> None:
    # While the first request is answered, the proxy stops reading once it holds 64 KiB of
    # the second one's body (uvicorn's flow control): the rest waits in the socket. That wait
    # is the proxy's, not the client's, and must not count against the body timeout.
    slow = chat_body(fake={"first_byte_delay": 2.5 * TIMEOUT})
    data = request(slow) + request(chat_body(pad="x" * 3_000_000))

    def exchange() -> list[int]:
        with Conn(server.port) as conn:
            sender = threading.Thread(target=conn.send, args=(data,), daemon=True)
            sender.start()
            statuses = [conn.response(within=10).status, conn.response(within=10).status]
            sender.join(5)
            return statuses

    statuses = await asyncio.get_running_loop().run_in_executor(None, exchange)
    assert statuses == [200, 200]
    assert len(forwarded(fake)) == 2


async def test_early_413_then_a_slow_body_is_cut_at_the_body_timeout(
    fake: FakeVLLM, server: ProxyServer
) -> None:
    # Content-Length says 1 GB: 413 at once, and the body that keeps coming is not read
    # forever.
    first = request(b"", length=False, headers=[("Content-Length", str(10**9))]) + b"{"
    received, elapsed = await trickle(server.port, first, b"x" * 100)
    assert received.startswith(b"HTTP/1.1 413 "), received[:200]
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 2
    assert forwarded(fake) == []
