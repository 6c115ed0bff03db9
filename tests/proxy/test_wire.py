"""proxy.upstream.wire's HTTP/1.1 client against raw asyncio servers on real loopback sockets.

Each test's server writes exact response bytes, so the test controls framing, timing and
faults, and records what it received (request bytes, connections, the client's close).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.core.errors import Overloaded, UpstreamError, UpstreamStreamBroken, UpstreamUnreachable
from proxy.core.transport import upstream_errors
from proxy.upstream.wire import (
    WireClient,
    WireClosed,
    WireConnectError,
    WireConnectTimeout,
    WirePoolFull,
    WireProtocolError,
    WireResponse,
)

PATH = "/v1/chat/completions"
CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"
# Every wait in a test is bounded: a hang is a failure, not a stuck suite.
BOUND = 3.0


def response(body: bytes = b"ok", *, status: bytes = b"200 OK", head: bytes = b"") -> bytes:
    """A Content-Length response; `head` holds extra header lines, each ending in CRLF."""
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n" + head
        + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@dataclass
class Request:
    """One request as the server read it off the socket."""

    line: bytes
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


@dataclass
class Conn:
    """The server's side of one accepted connection."""

    index: int
    reader: asyncio.StreamReader = field(repr=False)
    writer: asyncio.StreamWriter = field(repr=False)
    requests: list[Request] = field(default_factory=list, repr=False)
    eof: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # the client closed it

    async def request(self) -> Request | None:
        """The next request, or None when the client closed the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eof.set()
            return None
        line, *lines = head[:-4].split(b"\r\n")
        headers = []
        for raw in lines:
            name, _, value = raw.decode("latin-1").partition(":")
            headers.append((name.strip().lower(), value.strip()))
        length = int(dict(headers).get("content-length", "0"))
        body = await self.reader.readexactly(length)
        request = Request(line, headers, body, head + body)
        self.requests.append(request)
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_eof(self) -> None:
        """Read (and drop) whatever comes until the client closes the connection."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass
        self.eof.set()

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Conn], Coroutine[Any, Any, None]]


def answering(body: bytes = b"ok", *, mark_eof: bool = False) -> Handler:
    """A keep-alive server answering every request with `body` (Content-Length framed); with
    `mark_eof`, `conn.eof` is set when the client closes the connection."""

    async def handler(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(response(body))
        if mark_eof:
            conn.eof.set()

    return handler


class Server:
    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.conns: list[Conn] = []
        self.errors: list[BaseException] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    @property
    def requests(self) -> list[Request]:
        return [r for c in self.conns for r in c.requests]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(len(self.conns), reader, writer)
        self.conns.append(conn)
        # The handler runs as a task of its own, which close() cancels: asyncio's connection
        # callback task must end normally (3.11 logs a cancelled one as an error).
        handler = asyncio.create_task(self._handler(conn))
        self._handlers.add(handler)
        outer = asyncio.current_task()
        assert outer is not None
        self._tasks.add(outer)
        await asyncio.wait({handler})
        error = None if handler.cancelled() else handler.exception()
        if error is not None and not isinstance(
            error, ConnectionError | asyncio.IncompleteReadError
        ):
            self.errors.append(error)  # a broken test server must fail its test
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


class Net:
    """Servers, clients and responses of one test, all closed at its end."""

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.clients: list[WireClient] = []
        self.responses: list[WireResponse] = []

    async def serve(self, handler: Handler) -> Server:
        server = Server(handler)
        await server.start()
        self.servers.append(server)
        return server

    def client(
        self,
        *,
        max_connections: int = 10,
        connect_timeout: float = 1.0,
        keepalive_expiry: float = 5.0,
    ) -> WireClient:
        client = WireClient(
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            keepalive_expiry=keepalive_expiry,
        )
        self.clients.append(client)
        return client

    async def post(
        self,
        client: WireClient,
        url: str,
        body: bytes = b'{"x":1}',
        headers: dict[str, str] | None = None,
    ) -> WireResponse:
        request = client.build_request(
            "POST", url, content=body, headers=headers or {"content-type": "application/json"}
        )
        async with asyncio.timeout(BOUND):
            result = await client.send(request)
        self.responses.append(result)
        return result

    async def close(self) -> None:
        for r in self.responses:
            await r.aclose()
        for client in self.clients:
            await client.aclose()
        for server in self.servers:
            await server.close()
        # Let the transports run connection_lost before the loop goes.
        for _ in range(5):
            await asyncio.sleep(0.01)
        for server in self.servers:
            if server.errors:
                raise server.errors[0]


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    n = Net()
    try:
        yield n
    finally:
        await n.close()


async def wait(event: asyncio.Event, within: float = 1.0) -> None:
    async with asyncio.timeout(within):
        await event.wait()


async def collect(response: WireResponse) -> list[bytes]:
    async with asyncio.timeout(BOUND):
        return [c async for c in response.aiter_raw()]


# -- 1. Content-Length responses and the request bytes ------------------------------------------


async def test_content_length_response_and_request_bytes(net: Net) -> None:
    head = b"X-Multi: a\r\nx-multi: b\r\nX-Request-ID: r-1\r\n"

    async def handler(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(response(b'{"ok":true}', status=b"201 Created", head=head))

    server = await net.serve(handler)
    client = net.client()
    body = b'{"model":"tiny","messages":[]}'
    r = await net.post(
        client, server.url, body, {"content-type": "application/json", "x-request-id": "r-1"}
    )
    assert r.status_code == 201
    assert dict(r.headers) == {
        "content-type": "application/json",
        "x-multi": "a, b",
        "x-request-id": "r-1",
        "content-length": "11",
    }
    assert await r.aread() == b'{"ok":true}'

    [seen] = server.requests
    assert seen.line == b"POST /v1/chat/completions HTTP/1.1"
    assert seen.header("host") == f"127.0.0.1:{server.port}"
    assert seen.header("content-length") == str(len(body))
    assert seen.header("content-type") == "application/json"
    assert seen.header("x-request-id") == "r-1"
    assert {k for k, _ in seen.headers} == {
        "host",
        "content-length",
        "content-type",
        "x-request-id",
    }
    assert seen.body == body


async def test_query_string_and_large_body_are_sent_intact(net: Net) -> None:
    server = await net.serve(answering(b"fine"))
    client = net.client()
    # Above the single-buffer size: the body goes out as its own buffer.
    body = bytes(range(256)) * 1024 + b"tail"
    r = await net.post(client, server.url + "?a=1&b=2", body)
    assert await r.aread() == b"fine"
    [seen] = server.requests
    assert seen.line == b"POST /v1/chat/completions?a=1&b=2 HTTP/1.1"
    assert seen.header("content-length") == str(len(body))
    assert seen.body == body


# -- 2. Chunked responses, streamed ------------------------------------------------------------


async def test_chunked_stream_arrives_before_the_response_ends(net: Net) -> None:
    release = asyncio.Event()
    rest_written = asyncio.Event()

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD + chunk(b"data: first\n\n"))
        await release.wait()  # the client must get the first chunk without the rest
        await conn.send(chunk(b"data: second\n\n") + chunk(b"data: third\n\n"))
        await conn.send(LAST_CHUNK)
        rest_written.set()
        await conn.until_eof()

    server = await net.serve(handler)
    r = await net.post(net.client(), server.url)
    assert r.status_code == 200
    assert r.headers["transfer-encoding"] == "chunked"
    got: list[bytes] = []
    async with asyncio.timeout(BOUND):
        async for piece in r.aiter_raw():
            got.append(piece)
            if len(got) == 1:
                assert not rest_written.is_set()
                release.set()
                await rest_written.wait()
                await asyncio.sleep(0.05)  # both chunks and the end are buffered now
    # Everything buffered at a wake-up comes back as one piece.
    assert got == [b"data: first\n\n", b"data: second\n\ndata: third\n\n"]
    assert await r.aread() == b""


# -- 3. Keep-alive -------------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(net: Net) -> None:
    server = await net.serve(answering(b"same"))
    client = net.client()
    for i in range(3):
        r = await net.post(client, server.url, f'{{"i":{i}}}'.encode())
        assert await r.aread() == b"same"
    assert len(server.conns) == 1
    assert [q.body for q in server.conns[0].requests] == [b'{"i":0}', b'{"i":1}', b'{"i":2}']


async def test_chunked_and_empty_responses_keep_the_connection(net: Net) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD + chunk(b"a") + chunk(b"b") + LAST_CHUNK)
        await conn.request()
        await conn.send(b"HTTP/1.1 204 No Content\r\n\r\n")
        await conn.request()
        await conn.send(response(b"third"))
        await conn.until_eof()

    server = await net.serve(handler)
    client = net.client()
    assert b"".join(await collect(await net.post(client, server.url))) == b"ab"
    r = await net.post(client, server.url)
    assert r.status_code == 204
    assert await r.aread() == b""
    assert await (await net.post(client, server.url)).aread() == b"third"
    assert len(server.conns) == 1


async def test_connection_close_response_is_not_reused(net: Net) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        # The server says close but leaves the socket open: the client must close it.
        await conn.send(response(b"bye", head=b"connection: close\r\n"))
        await conn.until_eof()

    server = await net.serve(handler)
    client = net.client()
    assert await (await net.post(client, server.url)).aread() == b"bye"
    await wait(server.conns[0].eof)
    assert await (await net.post(client, server.url)).aread() == b"bye"
    assert len(server.conns) == 2


async def test_idle_connection_past_expiry_is_not_reused(net: Net) -> None:
    server = await net.serve(answering(mark_eof=True))
    client = net.client(keepalive_expiry=0.05)
    await (await net.post(client, server.url)).aread()
    await (await net.post(client, server.url)).aread()  # right away: still fresh
    assert len(server.conns) == 1
    await asyncio.sleep(0.1)
    await (await net.post(client, server.url)).aread()
    assert len(server.conns) == 2
    await wait(server.conns[0].eof)  # the expired connection was closed, not leaked


# -- 4. Connections the server closes --------------------------------------------------------


async def test_idle_connection_closed_by_server_is_replaced(net: Net) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(response(f"conn {conn.index}".encode()))
        if conn.index == 0:
            await asyncio.sleep(0.05)  # then close it, idle (uvicorn's keep-alive timeout)
            return
        await conn.until_eof()

    server = await net.serve(handler)
    client = net.client()
    assert await (await net.post(client, server.url)).aread() == b"conn 0"
    await asyncio.sleep(0.2)
    assert await (await net.post(client, server.url)).aread() == b"conn 1"
    assert len(server.conns) == 2


async def test_request_raced_by_keepalive_close_is_retried_on_a_fresh_connection(
    net: Net,
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(response(f"conn {conn.index}".encode()))
        if conn.index == 0:
            await conn.request()  # read the second request, then close without a byte
            return
        await conn.until_eof()

    server = await net.serve(handler)
    client = net.client()
    assert await (await net.post(client, server.url, b"one")).aread() == b"conn 0"
    assert await (await net.post(client, server.url, b"two")).aread() == b"conn 1"
    assert len(server.conns) == 2
    lost, retried = server.conns[0].requests[1], server.conns[1].requests[0]
    assert retried.body == b"two"
    assert retried.raw == lost.raw


async def test_fresh_connection_closed_without_response_is_not_retried(net: Net) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()

    server = await net.serve(handler)
    client = net.client()
    with pytest.raises(WireClosed):
        await net.post(client, server.url)
    with pytest.raises(UpstreamError) as info, upstream_errors("u"):
        await net.post(client, server.url)
    assert type(info.value) is UpstreamError
    assert isinstance(info.value.__cause__, WireClosed)
    assert len(server.conns) == 2  # one per request: no retries


async def test_reused_connection_closed_after_part_of_the_head_is_not_retried(
    net: Net,
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(response())
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-le")
        await asyncio.sleep(0.05)

    server = await net.serve(handler)
    client = net.client()
    await (await net.post(client, server.url)).aread()
    with pytest.raises(WireClosed):
        await net.post(client, server.url)
    assert len(server.conns) == 1  # the request may have run: never sent twice


async def test_stream_cut_mid_body_raises_wire_closed(net: Net) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD + chunk(b"data: 1\n\n") + b"20\r\npartial")
        await asyncio.sleep(0.05)

    server = await net.serve(handler)
    client = net.client()
    r = await net.post(client, server.url)
    got: list[bytes] = []
    with pytest.raises(WireClosed):
        async with asyncio.timeout(BOUND):
            async for piece in r.aiter_raw():
                got.append(piece)
    assert b"".join(got).startswith(b"data: 1\n\n")

    # The forwarder's view of the same fault once bytes went to its client.
    r = await net.post(client, server.url)
    with pytest.raises(UpstreamStreamBroken) as info, upstream_errors("u", started=True):
        async with asyncio.timeout(BOUND):
            async for _ in r.aiter_raw():
                pass
    assert isinstance(info.value.__cause__, WireClosed)
    assert len(server.conns) == 2


async def test_streamed_response_on_reused_connection_cut_mid_body_is_not_retried(
    net: Net,
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(response())
        await conn.request()
        await conn.send(CHUNKED_HEAD + chunk(b"x"))
        await asyncio.sleep(0.05)

    server = await net.serve(handler)
    client = net.client()
    await (await net.post(client, server.url)).aread()
    r = await net.post(client, server.url)
    with pytest.raises(WireClosed):
        await collect(r)
    assert len(server.conns) == 1


async def test_unsolicited_bytes_on_an_idle_connection_retire_it(net: Net) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(response(f"conn {conn.index}".encode()))
        if conn.index == 0:
            await asyncio.sleep(0.02)
            await conn.send(b"HTTP/1.1 200 OK\r\n")  # nobody asked: out of step
        await conn.until_eof()

    server = await net.serve(handler)
    client = net.client()
    assert await (await net.post(client, server.url)).aread() == b"conn 0"
    await wait(server.conns[0].eof)
    assert await (await net.post(client, server.url)).aread() == b"conn 1"


# -- 5. Bodies framed by the connection's end --------------------------------------------------


async def test_body_framed_by_eof(net: Net) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nhello ")
        await asyncio.sleep(0.02)
        await conn.send(b"world")

    server = await net.serve(handler)
    client = net.client()
    r = await net.post(client, server.url)
    assert r.status_code == 200
    async with asyncio.timeout(BOUND):
        assert await r.aread() == b"hello world"
    r = await net.post(client, server.url)
    assert b"".join(await collect(r)) == b"hello world"
    assert len(server.conns) == 2


async def test_eof_framed_body_cut_by_a_reset_is_an_error(net: Net) -> None:
    # A reset is not the end of a body framed by the connection's end (RFC 9112 8: an
    # incomplete message), unlike a clean FIN.
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npartial")
        await asyncio.sleep(0.05)
        conn.reset()

    server = await net.serve(handler)
    # On a loaded machine the reset may come before the head is read: an error either way,
    # never a body that ends cleanly with "partial".
    with pytest.raises(WireClosed):
        async with asyncio.timeout(BOUND):
            r = await net.post(net.client(), server.url)
            await r.aread()


# -- 6. Malformed responses ----------------------------------------------------------------------


async def test_malformed_response_is_a_protocol_error(net: Net) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"SMTP ready\r\n\r\n")
        await conn.until_eof()

    server = await net.serve(handler)
    client = net.client()
    with pytest.raises(WireProtocolError):
        await net.post(client, server.url)
    await wait(server.conns[0].eof)  # the client dropped the connection

    with pytest.raises(UpstreamError) as info, upstream_errors("x"):
        await net.post(client, server.url)
    assert type(info.value) is UpstreamError
    assert info.value.status == 502
    assert isinstance(info.value.__cause__, WireProtocolError)


async def test_malformed_chunk_mid_stream_is_a_protocol_error(net: Net) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD + chunk(b"good"))
        await asyncio.sleep(0.02)
        await conn.send(b"zz\r\nbad\r\n")
        await conn.until_eof()

    server = await net.serve(handler)
    r = await net.post(net.client(), server.url)
    got: list[bytes] = []
    with pytest.raises(WireProtocolError):
        async with asyncio.timeout(BOUND):
            async for piece in r.aiter_raw():
                got.append(piece)
    assert got == [b"good"]
    await wait(server.conns[0].eof)


# -- 7. Connecting, and the pool's limit ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_connection_refused(net: Net) -> None:
    client = net.client(max_connections=1)
    url = f"http://127.0.0.1:{free_port()}{PATH}"
    with pytest.raises(WireConnectError):
        await net.post(client, url)
    # The failed connect gave its slot back: the next one fails the same way, not by timeout.
    with pytest.raises(UpstreamUnreachable) as info, upstream_errors("u"):
        await net.post(client, url)
    assert isinstance(info.value.__cause__, WireConnectError)
    assert not isinstance(info.value.__cause__, WireConnectTimeout)


async def test_only_http_and_https_urls(net: Net) -> None:
    for url in ("ftp://127.0.0.1/v1", "unix:///run/x", "http:///v1"):
        with pytest.raises(WireConnectError):
            net.client().build_request("POST", url, content=b"", headers={})


async def test_pool_slot_timeout_then_freed_by_aclose(net: Net) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        if conn.index == 0:
            await conn.send(CHUNKED_HEAD + chunk(b"held"))  # and never the rest
            await conn.until_eof()
            return
        await conn.send(response(b"next"))
        await conn.until_eof()

    server = await net.serve(handler)
    client = net.client(max_connections=1, connect_timeout=0.2)
    held = await net.post(client, server.url)
    start = time.monotonic()
    with pytest.raises(WirePoolFull):
        await net.post(client, server.url)
    assert 0.15 <= time.monotonic() - start < 1.0
    # The proxy's own limit, not the upstream's failure.
    with pytest.raises(Overloaded) as info, upstream_errors("u"):
        await net.post(client, server.url)
    assert info.value.status == 503 and info.value.headers["retry-after"] == "1"
    assert len(server.conns) == 1

    await held.aclose()
    await wait(server.conns[0].eof)
    assert await (await net.post(client, server.url)).aread() == b"next"
    assert len(server.conns) == 2


async def test_slot_waiter_reuses_the_released_connection(net: Net) -> None:
    finish = asyncio.Event()

    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.request()
            await conn.send(CHUNKED_HEAD + chunk(b"first"))
            await finish.wait()
            await conn.send(LAST_CHUNK)
        await answering(b"second")(conn)

    server = await net.serve(handler)
    client = net.client(max_connections=1, connect_timeout=2.0)
    first = await net.post(client, server.url)
    waiting = asyncio.create_task(net.post(client, server.url))
    try:
        await asyncio.sleep(0.05)
        assert not waiting.done()
        finish.set()
        assert b"".join(await collect(first)) == b"first"
        async with asyncio.timeout(BOUND):
            second = await waiting
        assert await second.aread() == b"second"
    finally:
        waiting.cancel()
        with contextlib.suppress(BaseException):
            await waiting
    # The connection went back to the pool as the waiter woke: it is the one to use, not a
    # second one next to it (max_connections=1).
    assert len(server.conns) == 1, "the waiter opened a new connection beside the idle one"


async def test_cancelled_slot_waiter_passes_the_free_slot_on(net: Net) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        if conn.index == 0:
            await conn.send(CHUNKED_HEAD + chunk(b"held"))
            await conn.until_eof()
            return
        await conn.send(response(b"free"))
        await conn.until_eof()

    server = await net.serve(handler)
    client = net.client(max_connections=1, connect_timeout=1.0)
    held = await net.post(client, server.url)
    first = asyncio.create_task(net.post(client, server.url))
    second = asyncio.create_task(net.post(client, server.url))
    try:
        await asyncio.sleep(0.05)
        assert not first.done()
        assert not second.done()
        # The slot frees and wakes `first`, which is cancelled before it runs (its client
        # left): the slot must go to `second`, not wait out its timeout.
        await held.aclose()
        first.cancel()
        start = time.monotonic()
        try:
            r = await second
        except WirePoolFull:
            pytest.fail("the slot freed for the cancelled waiter was lost: the next one timed out")
        assert time.monotonic() - start < 0.5
        assert await r.aread() == b"free"
    finally:
        for task in (first, second):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


# -- 8. Cancellation and abandoned responses -------------------------------------------------


async def test_cancelled_send_closes_the_connection_and_frees_the_slot(net: Net) -> None:
    got = asyncio.Event()

    async def handler(conn: Conn) -> None:
        await conn.request()
        if conn.index == 0:
            got.set()
            await conn.until_eof()  # never answers
            return
        await conn.send(response(b"after"))
        await conn.until_eof()

    server = await net.serve(handler)
    client = net.client(max_connections=1, connect_timeout=0.5)
    task = asyncio.create_task(net.post(client, server.url))
    await wait(got)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait(server.conns[0].eof)  # the close is what tells the engine to stop
    assert await (await net.post(client, server.url)).aread() == b"after"
    assert len(server.conns) == 2


async def test_aclose_of_an_unfinished_stream_closes_the_connection(net: Net) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        if conn.index == 0:
            await conn.send(CHUNKED_HEAD + chunk(b"one"))
            await asyncio.sleep(0.02)
            await conn.send(chunk(b"two"))
            await conn.until_eof()
            return
        await conn.send(response(b"after"))
        await conn.until_eof()

    server = await net.serve(handler)
    client = net.client(max_connections=1, connect_timeout=0.5)
    r = await net.post(client, server.url)
    async with asyncio.timeout(BOUND):
        assert await anext(r.aiter_raw()) == b"one"
    await r.aclose()
    await wait(server.conns[0].eof)
    assert await (await net.post(client, server.url)).aread() == b"after"
    assert len(server.conns) == 2
    await r.aclose()  # twice is harmless


async def test_aclose_of_a_finished_response_keeps_the_connection(net: Net) -> None:
    server = await net.serve(answering(b"done"))
    client = net.client(max_connections=1)
    r = await net.post(client, server.url)
    assert await r.aread() == b"done"
    await r.aclose()
    assert await (await net.post(client, server.url)).aread() == b"done"
    assert len(server.conns) == 1
    assert not server.conns[0].eof.is_set()


# -- 9. Flow control -------------------------------------------------------------------------------

PIECE = 64 * 1024
PIECES = 128  # 8 MiB


async def test_slow_reader_pauses_the_upstream_socket(net: Net) -> None:
    go = asyncio.Event()
    drained = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []
    pieces = [i.to_bytes(4, "big") * (PIECE // 4) for i in range(PIECES)]

    async def handler(conn: Conn) -> None:
        await conn.request()
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        writers.append(conn.writer)
        await conn.send(CHUNKED_HEAD)
        await go.wait()
        conn.writer.write(b"".join(chunk(p) for p in pieces) + LAST_CHUNK)
        await conn.writer.drain()
        drained.set()
        await conn.until_eof()

    server = await net.serve(handler)
    r = await net.post(net.client(), server.url)
    # Small, fixed kernel buffers on the client's side too (white box: the socket under the
    # response), so what the kernels hold cannot hide whether the client stopped reading.
    assert r._conn is not None
    transport = r._conn._transport
    assert transport is not None
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    go.set()

    await asyncio.sleep(0.5)
    assert not drained.is_set(), "the client read everything without being asked"
    [writer] = writers
    assert writer.transport.get_write_buffer_size() > PIECES * PIECE // 2
    assert 0 < r._size < 1024 * 1024

    got = b"".join(await collect(r))
    assert len(got) == PIECES * PIECE
    assert got == b"".join(pieces)
    await wait(drained)
    assert len(server.conns) == 1


async def test_aread_of_a_body_above_the_high_water_mark(net: Net) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, in one Content-Length response
    server = await net.serve(answering(body))
    client = net.client()
    r = await net.post(client, server.url)
    async with asyncio.timeout(2.0):
        assert await r.aread() == body
    assert await (await net.post(client, server.url)).aread() == body
    assert len(server.conns) == 1


# -- 10. Header injection --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"x-request-id": "a\r\nx-evil: 1"},
        {"x-request-id": "a\nx-evil: 1"},
        {"x-request-id": "a\rb"},
        {"x-evil: 1\r\nx-request-id": "a"},
    ],
)
async def test_line_breaks_in_outbound_headers_are_refused(
    net: Net, headers: dict[str, str]
) -> None:
    client = net.client()
    with pytest.raises(ValueError, match="line break"):
        client.build_request("POST", f"http://127.0.0.1:1{PATH}", content=b"", headers=headers)


# -- 11. Interim responses ---------------------------------------------------------------------


@pytest.mark.parametrize("apart", [False, True], ids=["one-write", "two-writes"])
async def test_100_continue_then_the_real_response(net: Net, apart: bool) -> None:
    async def handler(conn: Conn) -> None:
        while await conn.request() is not None:
            interim = b"HTTP/1.1 100 Continue\r\nx-interim: 1\r\n\r\n"
            if apart:
                await conn.send(interim)
                await asyncio.sleep(0.02)
                await conn.send(response(b"real"))
            else:
                await conn.send(interim + response(b"real"))

    server = await net.serve(handler)
    client = net.client()
    for _ in range(2):
        r = await net.post(client, server.url)
        assert r.status_code == 200
        assert "x-interim" not in r.headers
        assert await r.aread() == b"real"
    assert len(server.conns) == 1


# -- 12. Closing the client ----------------------------------------------------------------------


async def test_client_aclose_closes_idle_connections(net: Net) -> None:
    server = await net.serve(answering(mark_eof=True))
    client = net.client()
    rs = await asyncio.gather(*(net.post(client, server.url) for _ in range(3)))
    for r in rs:
        assert await r.aread() == b"ok"
    assert len(server.conns) == 3
    await client.aclose()
    for conn in server.conns:
        await wait(conn.eof)


# -- 13. Connections out of step with their requests -------------------------------------------
# A connection is reused only if its bytes were exactly one response to the request sent: bytes
# after the response's end (in the same read or later), a second message, or an early answer
# while the request is still being written all retire it, whatever the read boundaries.

CL_OK = response(b"first")
CHUNKED_OK = CHUNKED_HEAD + chunk(b"fir") + chunk(b"st") + LAST_CHUNK
AFTER = {
    "a-whole-second-response": response(b"unasked"),
    "part-of-a-second-response": b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\nunas",
    "a-status-line-prefix": b"HTTP/1.",
    "garbage": b"zz\r\n",
    "crlf": b"\r\n",
    "lf": b"\n",
    "two-crlf": b"\r\n\r\n",
}


def desynced(first: bytes, extra: bytes, *, apart: bool = False) -> Handler:
    """Answers the first request with `first` followed by `extra` (in one write, or in two
    with `apart`), every later one (and any other connection) with 'conn N'."""

    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.request()
            if apart:
                await conn.send(first)
                await asyncio.sleep(0.02)
                await conn.send(extra)
            else:
                await conn.send(first + extra)
        while await conn.request() is not None:
            await conn.send(response(f"conn {conn.index}".encode()))

    return handler


@pytest.mark.parametrize("first", [CL_OK, CHUNKED_OK], ids=["content-length", "chunked"])
@pytest.mark.parametrize("extra", list(AFTER.values()), ids=list(AFTER))
@pytest.mark.parametrize("apart", [False, True], ids=["same-read", "later-read"])
async def test_bytes_after_the_response_retire_the_connection(
    net: Net, first: bytes, extra: bytes, apart: bool
) -> None:
    server = await net.serve(desynced(first, extra, apart=apart))
    client = net.client()
    r = await net.post(client, server.url)
    assert b"".join(await collect(r)) == b"first"
    await wait(server.conns[0].eof)  # retired, not pooled
    assert await (await net.post(client, server.url)).aread() == b"conn 1"
    assert len(server.conns) == 2
    assert len(server.conns[0].requests) == 1  # the second request never went out of step


async def test_204_with_a_body_retires_the_connection(net: Net) -> None:
    # A 204 has no body whatever its Content-Length: the three bytes begin no response.
    no_content = b"HTTP/1.1 204 No Content\r\ncontent-length: 3\r\n\r\n"
    server = await net.serve(desynced(no_content, b"abc"))
    client = net.client()
    r = await net.post(client, server.url)
    assert r.status_code == 204
    assert await r.aread() == b""
    await wait(server.conns[0].eof)
    assert await (await net.post(client, server.url)).aread() == b"conn 1"


async def test_interim_response_followed_by_garbage_is_a_protocol_error(net: Net) -> None:
    server = await net.serve(desynced(b"HTTP/1.1 100 Continue\r\n\r\n", b"zz\r\n\r\n"))
    client = net.client()
    with pytest.raises(WireProtocolError):
        await net.post(client, server.url)
    await wait(server.conns[0].eof)
    assert await (await net.post(client, server.url)).aread() == b"conn 1"


async def test_an_answer_before_the_request_was_written_retires_the_connection(net: Net) -> None:
    # The server answers after the head, before reading an 8 MiB body: what it makes of the
    # rest of the body is unknown, so the connection must not carry another request.
    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.reader.readuntil(b"\r\n\r\n")
            await conn.send(response(b"early"))
            await conn.until_eof()
            return
        await answering(b"conn 1")(conn)

    server = await net.serve(handler)
    client = net.client()
    r = await net.post(client, server.url, b"x" * (8 * 1024 * 1024))
    assert await r.aread() == b"early"
    await wait(server.conns[0].eof, within=BOUND)
    assert await (await net.post(client, server.url)).aread() == b"conn 1"


# -- 14. Protocol violations -----------------------------------------------------------------------
# Each is a WireProtocolError for the request (never another exception, never a hang) and the
# connection is closed.

VIOLATIONS = {
    "101-websocket": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
    b"connection: upgrade\r\n\r\n",
    "101-bare": b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    "101-after-100": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n\r\n",
    "invalid-status-line": b"HTTP/1.1 2000 OK\r\n\r\n",
    "status-line-without-version": b"200 OK\r\ncontent-length: 0\r\n\r\n",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "http2-settings-frame": b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64",
    "http2-version": b"HTTP/2.0 200 OK\r\ncontent-length: 0\r\n\r\n",
    "ssh-banner": b"SSH-2.0-OpenSSH_9.2\r\n",
    "rtsp-banner": b"RTSP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
    "ice-banner": b"ICE/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
    "content-length-and-chunked": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
    b"transfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "two-content-lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
    "negative-content-length": b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
    "oversized-content-length": b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
    "transfer-coding-gzip": b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nabc",
    "transfer-coding-gzip-chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\ncontent-length: 2\n\nok",
    "nul-in-header": b"HTTP/1.1 200 OK\r\nx: a\x00b\r\ncontent-length: 2\r\n\r\nok",
    "head-too-large": b"HTTP/1.1 200 OK\r\n" + b"x-pad: " + b"a" * 70_000 + b"\r\n\r\n",
    "too-many-header-lines": b"HTTP/1.1 200 OK\r\n" + b"x: y\r\n" * 20_000,
    "endless-interim-responses": b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" * 3000,
}


@pytest.mark.parametrize("bytes_", list(VIOLATIONS.values()), ids=list(VIOLATIONS))
async def test_protocol_violations_are_protocol_errors(net: Net, bytes_: bytes) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(bytes_)
        await conn.until_eof()

    server = await net.serve(handler)
    client = net.client()
    with pytest.raises(WireProtocolError):
        r = await net.post(client, server.url)
        await collect(r)
    await wait(server.conns[0].eof)


async def test_trailers_are_read_but_bounded(net: Net) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD + chunk(b"data") + b"0\r\nx-trailer: 1\r\n\r\n")
        await conn.request()
        # Trailers that never end: never a body byte again.
        await conn.send(CHUNKED_HEAD + chunk(b"more") + b"0\r\n" + b"x-t: 1\r\n" * 20_000)
        await conn.until_eof()

    server = await net.serve(handler)
    client = net.client()
    r = await net.post(client, server.url)
    assert b"".join(await collect(r)) == b"data"
    assert "x-trailer" not in r.headers
    r = await net.post(client, server.url)
    with pytest.raises(WireProtocolError):
        await collect(r)
    assert len(server.conns) == 1
    await wait(server.conns[0].eof)


async def test_a_head_arriving_a_byte_at_a_time_is_bounded(net: Net) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nx-pad: ")
        try:
            for _ in range(70):
                await conn.send(b"a" * 1024)
                await asyncio.sleep(0)
        except ConnectionError:
            conn.eof.set()  # the client closed it mid-head
        await conn.until_eof()

    server = await net.serve(handler)
    with pytest.raises(WireProtocolError):
        await net.post(net.client(), server.url)
    await wait(server.conns[0].eof)


@pytest.mark.parametrize("status", [102, 103, 199])
async def test_other_interim_responses_are_skipped(net: Net, status: int) -> None:
    async def handler(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(b"HTTP/1.1 %d Interim\r\nx-interim: 1\r\n\r\n" % status)
            await conn.send(response(b"real"))

    server = await net.serve(handler)
    client = net.client()
    for _ in range(2):
        r = await net.post(client, server.url)
        assert r.status_code == 200
        assert "x-interim" not in r.headers
        assert await r.aread() == b"real"
    assert len(server.conns) == 1
