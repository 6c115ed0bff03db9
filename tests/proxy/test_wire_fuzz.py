"""Property tests of proxy.wire's response parsing and framing (hypothesis).

Generated responses (any status, headers, Content-Length / chunked / connection-end framing,
interim 1xx before them, HTTP/1.0 or 1.1) are cut into random reads, followed by random
unasked bytes, or mutated by random insertions. Whatever the bytes and the read boundaries:

- the body delivered is the body sent, when the bytes were a valid response;
- a connection goes back to the pool only if its bytes were exactly one awaited response, and
  one that did is read in step: the next response on it is read exactly;
- nothing but a `WireError` ever reaches the reader, and the pool's count stays right.

Read boundaries can only be chosen exactly by feeding the connection's protocol directly: most
tests do, through `_Transport`, which stands in for the socket (it records what the protocol
asks of it). One test runs the same property over real loopback sockets.

CI runs the `ci` profile: derandomized, a fixed number of examples, in a few seconds.
`HYPOTHESIS_PROFILE=dev` runs many more.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.upstream.wire import WireClient, WireError, WireProtocolError, WireResponse, _Conn, _Pool
from tests.proxy.test_wire import Conn as ServerConn
from tests.proxy.test_wire import Net

settings.register_profile(
    "ci",
    max_examples=200,
    # No per-example deadline: on a loaded CI machine one can take seconds. The properties that
    # feed the parser directly cannot hang, and the one over real sockets has its own timeout,
    # so a deadline would only add flaky failures.
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

T = TypeVar("T")
REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: fuzz\r\ncontent-length: 2\r\n\r\n"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# -- generated responses ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    data: bytes
    status: int
    body: bytes
    keep: bool  # the connection may carry another request after it
    until_eof: bool  # its body ends with the connection


TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=0, max_size=20).map(
    str.strip
)


@st.composite
def chunked_body(draw: st.DrawFn, body: bytes) -> bytes:
    out, i = [], 0
    while i < len(body):
        n = draw(st.integers(1, max(1, len(body) - i)))
        ext = draw(st.sampled_from([b"", b";x=1", b";name"]))
        out.append(b"%x%s\r\n%s\r\n" % (n, ext, body[i : i + n]))
        i += n
    trailers = draw(st.lists(st.tuples(TOKEN, VALUE), max_size=2))
    out.append(b"0\r\n" + b"".join(b"x-%s: %s\r\n" % (k.encode(), v.encode()) for k, v in trailers))
    out.append(b"\r\n")
    return b"".join(out)


@st.composite
def responses(draw: st.DrawFn) -> Response:
    status = draw(st.sampled_from([200, 201, 204, 304, 400, 404, 429, 500, 503]))
    version = draw(st.sampled_from(["1.1", "1.1", "1.0"]))
    no_body = status in (204, 304)
    framing = "none" if no_body else draw(st.sampled_from(["length", "chunked", "eof"]))
    if version == "1.0" and framing == "chunked":
        framing = "length"  # HTTP/1.0 has no chunked coding
    body = b"" if no_body else draw(st.binary(max_size=1024))
    connection = draw(st.sampled_from([None, "close", "keep-alive"]))
    lines = [f"HTTP/{version} {status} Whatever"]
    fields = draw(st.lists(st.tuples(TOKEN, VALUE), max_size=4))
    lines += [f"x-{name}: {value}" for name, value in fields]
    if connection is not None:
        lines.append(f"connection: {connection}")
    if framing == "length":
        lines.append(f"content-length: {len(body)}")
    elif framing == "chunked":
        lines.append("transfer-encoding: chunked")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    interim = b"".join(
        b"HTTP/1.1 %d Interim\r\ninterim-only: 1\r\n\r\n" % code
        for code in draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2))
    )
    payload = draw(chunked_body(body)) if framing == "chunked" else body
    alive = connection == "keep-alive" if version == "1.0" else connection != "close"
    eof = framing == "eof"
    return Response(interim + head + payload, status, body, alive and not eof, eof)


def cuts(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """`data` cut into random non-empty reads."""
    points = st.lists(st.integers(1, max(1, len(data) - 1)), max_size=8, unique=True)
    return points.map(lambda ps: _pieces(data, sorted(p for p in ps if p < len(data))))


def _pieces(data: bytes, points: list[int]) -> list[bytes]:
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


EXTRA = st.one_of(
    st.binary(min_size=1, max_size=40),
    st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"HTTP/1.1 ", b"HTTP/1.1 200 OK\r\n"]),
    responses().map(lambda r: r.data),
)


# -- driving one connection ------------------------------------------------------------------------


class _Transport:
    """What `_Conn` asks of its transport, recorded; `buffered` is the unsent request bytes."""

    def __init__(self, buffered: int = 0) -> None:
        self.buffered = buffered
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, parts: object) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return self.buffered


class Link:
    """One pooled connection fed exact reads; `send` starts a request on it."""

    def __init__(self, buffered: int = 0) -> None:
        self.pool = _Pool("fuzz", 80, 4, 1.0, 60.0)
        self.conn = _Conn(self.pool)
        self.transport = _Transport(buffered)
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        self.pool._busy += 1  # as _acquire leaves a new connection
        self.conn.in_use = True

    def send(self) -> WireResponse:
        return self.conn.start(REQUEST, b"{}")

    def feed(self, pieces: list[bytes], *, close: bool = False) -> None:
        for piece in pieces:
            if self.conn.closed:
                return  # a closed transport delivers nothing more
            self.conn.data_received(piece)
        if close and not self.conn.closed:
            self.conn.eof_received()
            self.conn.connection_lost(None)
        elif self.transport.closed:
            self.conn.connection_lost(None)  # the close the protocol asked for completes

    @property
    def pooled(self) -> bool:
        return self.conn in self.pool._idle

    def check_accounting(self) -> None:
        assert self.pool._busy == (1 if self.conn.in_use else 0)
        assert self.pooled == (not self.conn.closed and not self.conn.in_use)
        assert not self.conn.closed or self.transport.closed


def outcome(response: WireResponse) -> tuple[str, bytes]:
    """("done", body), ("error", b"") or ("waiting", b"") without awaiting anything."""
    if response._error is not None:
        assert isinstance(response._error, WireError), repr(response._error)
        return "error", b""
    if response._done:
        return "done", b"".join(response._chunks)
    return "waiting", b""


async def in_step(link: Link, next_response: Response, pieces: list[bytes]) -> None:
    """A pooled connection reads the next response exactly."""
    taken = link.pool._take_idle(asyncio.get_running_loop().time())
    assert taken is link.conn
    response = link.send()
    link.feed(pieces, close=next_response.until_eof)
    assert outcome(response) == ("done", next_response.body)
    assert response.status_code == next_response.status


# -- the properties --------------------------------------------------------------------------------


@given(st.data())
def test_a_valid_response_is_read_exactly_whatever_the_reads(data: st.DataObject) -> None:
    response = data.draw(responses())
    pieces = data.draw(cuts(response.data))
    buffered = data.draw(st.sampled_from([0, 0, 0, 10]))

    async def scenario() -> None:
        link = Link(buffered)
        got = link.send()
        link.feed(pieces, close=response.until_eof)
        assert outcome(got) == ("done", response.body)
        assert got.status_code == response.status
        assert "interim-only" not in got.headers  # interim heads are dropped
        link.check_accounting()
        assert link.pooled == (response.keep and not buffered)
        if link.pooled:
            following = data.draw(responses())
            await in_step(link, following, data.draw(cuts(following.data)))
            link.check_accounting()

    run(scenario())


@given(st.data())
def test_bytes_after_the_response_retire_the_connection(data: st.DataObject) -> None:
    response = data.draw(responses().filter(lambda r: not r.until_eof))
    extra = data.draw(EXTRA)
    pieces = data.draw(cuts(response.data + extra))

    async def scenario() -> None:
        link = Link()
        got = link.send()
        link.feed(pieces)
        assert outcome(got) == ("done", response.body)
        assert not link.pooled
        assert link.conn.closed
        link.check_accounting()

    run(scenario())


@given(st.data())
def test_mutated_bytes_never_escape_as_anything_but_wire_errors(data: st.DataObject) -> None:
    response = data.draw(responses())
    raw = bytearray(response.data)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    pieces = data.draw(cuts(bytes(raw)))
    close = data.draw(st.booleans())

    async def scenario() -> None:
        link = Link()
        got = link.send()
        link.feed(pieces, close=close)  # raises if anything but a WireError escaped
        state, _ = outcome(got)
        link.check_accounting()
        if link.pooled:
            # Whatever these bytes were, the parser took them for exactly one response.
            assert state == "done"
            following = data.draw(responses())
            await in_step(link, following, data.draw(cuts(following.data)))
        elif state == "waiting":
            await got.aclose()  # the reader gives up (a timeout): the connection goes
            assert link.conn.closed
            link.check_accounting()

    run(scenario())


@given(st.data())
def test_a_response_cut_short_is_an_error_never_a_shorter_body(data: st.DataObject) -> None:
    response = data.draw(responses().filter(lambda r: len(r.data) > 1))
    end = data.draw(st.integers(1, len(response.data) - 1))
    pieces = data.draw(cuts(response.data[:end]))
    close = data.draw(st.booleans())

    async def scenario() -> None:
        link = Link()
        got = link.send()
        link.feed(pieces, close=close)
        state, body = outcome(got)
        assert not link.pooled
        if state == "done":
            # Only a body framed by the connection's end is complete at a close.
            assert response.until_eof and close
            assert response.body.startswith(body)
        elif not close:
            assert state == "waiting"
        else:
            assert state == "error"
        link.check_accounting()

    run(scenario())


@st.composite
def violations(draw: st.DrawFn) -> bytes:
    """Response bytes that break the HTTP/1.1 the proxy asked for, each its own way."""
    kind = draw(st.sampled_from(["101", "version", "coding", "head", "interim", "banner"]))
    body = b"content-length: 2\r\n\r\n{}"
    if kind == "101":
        extra = draw(st.sampled_from([b"", b"upgrade: websocket\r\nconnection: upgrade\r\n"]))
        return b"HTTP/1.1 101 Switching Protocols\r\n" + extra + b"\r\n"
    if kind == "version":
        version = draw(st.sampled_from([b"HTTP/2.0", b"HTTP/3.0", b"RTSP/1.0", b"ICE/1.0"]))
        return version + b" 200 OK\r\n" + body
    if kind == "coding":
        coding = draw(
            st.sampled_from([b"gzip", b"gzip, chunked", b"identity", b"chunked, chunked"])
        )
        return b"HTTP/1.1 200 OK\r\ntransfer-encoding: " + coding + b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    if kind == "head":
        if draw(st.booleans()):
            size = draw(st.integers(66_000, 100_000))
            return b"HTTP/1.1 200 OK\r\nx-pad: " + b"a" * size + b"\r\n" + body
        return b"HTTP/1.1 200 OK\r\n" + b"x: y\r\n" * draw(st.integers(11_000, 20_000)) + body
    if kind == "interim":
        # Interim heads that never end, or end in a final head after 64 KiB of them.
        final = draw(st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n" + body]))
        early = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
        return early * draw(st.integers(1700, 4000)) + final
    return draw(st.sampled_from([b"SSH-2.0-x\r\n", b"\x00\x00\x12\x04\x00", b"220 ready\r\n"]))


@given(st.data())
def test_protocol_violations_are_protocol_errors_whatever_the_reads(data: st.DataObject) -> None:
    raw = data.draw(violations())
    pieces = data.draw(cuts(raw))
    close = data.draw(st.booleans())

    async def scenario() -> None:
        link = Link()
        got = link.send()
        link.feed(pieces, close=close)
        assert isinstance(got._error, WireProtocolError), (got._error, got._done)
        assert link.conn.closed
        link.check_accounting()

    run(scenario())


# -- the same over real sockets --------------------------------------------------------------------


@settings(max_examples=max(10, settings().max_examples // 8))
@given(st.data())
def test_over_real_sockets_reads_and_reuse_match(data: st.DataObject) -> None:
    first = data.draw(responses().filter(lambda r: not r.until_eof))
    extra = data.draw(st.one_of(st.just(b""), EXTRA))
    pieces = data.draw(cuts(first.data + extra))

    async def scenario() -> None:
        net = Net()
        try:

            async def handler(conn: ServerConn) -> None:
                if conn.index == 0:
                    await conn.request()
                    for piece in pieces:
                        await conn.send(piece)
                        await asyncio.sleep(0)
                while await conn.request() is not None:
                    await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext")

            server = await net.serve(handler)
            client: WireClient = net.client()
            async with asyncio.timeout(5):
                got = await net.post(client, server.url)
                assert got.status_code == first.status
                assert await got.aread() == first.body
                again = await net.post(client, server.url)
                assert await again.aread() == b"next"
            in_step_reused = len(server.conns) == 1
            assert in_step_reused == (first.keep and not extra), (len(server.conns), extra)
        finally:
            await net.close()

    run(scenario())
