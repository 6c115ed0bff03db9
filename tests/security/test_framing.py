"""Scenario 30 and request smuggling, head limits and upgrades, over real sockets.

Every hostile request carries a valid chat body, so a proxy that let it through would forward
it: the fake's record tells. A refusal is an OpenAI-shaped 400/431 and the connection closed.
"""

from __future__ import annotations

import time

import pytest

from proxy.telemetry.metrics import ProxyMetrics
from tests.conftest import ProxyFactory
from tests.fakes.harness import ProxyServer
from tests.fakes.vllm import FakeVLLM
from tests.security.conftest import forwarded
from tests.security.raw import CHAT_PATH, Conn, chat_body, chunked, request

BODY = chat_body()
CHUNKED = chunked(BODY)


def refused(server: ProxyServer, data: bytes, status: int = 400) -> dict[str, object]:
    """Send `data`; assert one JSON error answer, then the connection closed. The error."""
    with Conn(server.port) as conn:
        conn.send(data)
        response = conn.response(within=5)
        assert response.status == status, response
        assert response.headers.get("connection") == "close"
        assert conn.closed(within=3), "the connection stayed open"
        assert conn.buffer == b"", f"more after the refusal: {conn.buffer[:200]!r}"
    return response.error()


FRAMING = {
    "content-length-then-transfer-encoding": request(
        CHUNKED,
        length=False,
        headers=[("Content-Length", str(len(CHUNKED))), ("Transfer-Encoding", "chunked")],
    ),
    "transfer-encoding-then-content-length": request(
        CHUNKED,
        length=False,
        headers=[("Transfer-Encoding", "chunked"), ("Content-Length", str(len(CHUNKED)))],
    ),
    "two-different-content-lengths": request(
        BODY,
        length=False,
        headers=[("Content-Length", str(len(BODY))), ("Content-Length", str(len(BODY) - 5))],
    ),
    "two-equal-content-lengths": request(
        BODY, length=False, headers=[("Content-Length", str(len(BODY)))] * 2
    ),
    "content-length-list": request(
        BODY, length=False, headers=[("Content-Length", f"{len(BODY)}, {len(BODY)}")]
    ),
    "content-length-plus-sign": request(
        BODY, length=False, headers=[("Content-Length", f"+{len(BODY)}")]
    ),
    "space-before-colon": request(
        CHUNKED, length=False, headers=[("Transfer-Encoding ", "chunked")]
    ),
    "obs-fold-transfer-encoding": request(
        CHUNKED, length=False, headers=[("Transfer-Encoding", "\r\n chunked")]
    ),
    "chunked-not-last": request(
        CHUNKED, length=False, headers=[("Transfer-Encoding", "chunked, identity")]
    ),
    "two-transfer-encodings": request(
        CHUNKED, length=False, headers=[("Transfer-Encoding", "chunked")] * 2
    ),
    "unknown-transfer-encoding": request(
        BODY, length=False, headers=[("Transfer-Encoding", "xchunked")]
    ),
    "bad-chunk-size": request(
        b"zz\r\n" + BODY + b"\r\n0\r\n\r\n",
        length=False,
        headers=[("Transfer-Encoding", "chunked")],
    ),
    "chunk-longer-than-its-size": request(
        b"%x\r\n%b\r\n0\r\n\r\n" % (len(BODY) - 3, BODY),
        length=False,
        headers=[("Transfer-Encoding", "chunked")],
    ),
    "chunk-size-overflow": request(
        b"f" * 20 + b"\r\n" + BODY + b"\r\n0\r\n\r\n",
        length=False,
        headers=[("Transfer-Encoding", "chunked")],
    ),
    "chunk-lf-only": request(
        b"%x\n%b\n0\n\n" % (len(BODY), BODY),
        length=False,
        headers=[("Transfer-Encoding", "chunked")],
    ),
    "nul-in-header-value": request(BODY, headers=[("X-Note", "a\x00b")]),
    "bare-lf-head": request(BODY).replace(b"\r\n", b"\n"),
}


@pytest.mark.parametrize("data", FRAMING.values(), ids=FRAMING.keys())
def test_bad_framing_is_400_closed_and_not_forwarded(
    fake: FakeVLLM, server: ProxyServer, data: bytes
) -> None:
    error = refused(server, data)
    assert error["code"] == "malformed_request"
    assert error["type"] == "invalid_request_error"
    assert forwarded(fake) == []


def test_valid_chunked_request_is_served_with_a_content_length_upstream(
    fake: FakeVLLM, server: ProxyServer
) -> None:
    # The control for the cases above: the same body, framed correctly, goes through.
    with Conn(server.port) as conn:
        conn.send(request(CHUNKED, length=False, headers=[("Transfer-Encoding", "chunked")]))
        assert conn.response().status == 200
    (seen,) = forwarded(fake)
    assert seen.headers["content-length"] == str(len(seen.raw))
    assert "transfer-encoding" not in seen.headers


# -- smuggling ---------------------------------------------------------------------------------

SMUGGLED = b"GET /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def test_request_hidden_in_a_json_string_stays_body(fake: FakeVLLM, server: ProxyServer) -> None:
    text = (b"\r\n\r\n" + SMUGGLED + request(BODY, target="/tokenize")).decode()
    with Conn(server.port) as conn:
        conn.send(request(chat_body(note=text)) + request(BODY))
        assert [conn.response().status, conn.response().status] == [200, 200]
    sent = forwarded(fake)
    assert [(s.method, s.path) for s in sent] == [("POST", CHAT_PATH)] * 2
    assert sent[0].body["note"] == text
    assert fake.requests_to("/tokenize") == []


def test_request_after_the_declared_length_is_a_request_to_the_proxy(
    fake: FakeVLLM, server: ProxyServer
) -> None:
    # Bytes past Content-Length are the next request on the connection: the proxy's to answer
    # (404), never the engine's.
    with Conn(server.port) as conn:
        conn.send(request(BODY) + SMUGGLED + request(BODY, target="/tokenize"))
        statuses = [conn.response().status for _ in range(3)]
    assert statuses == [200, 404, 404]
    assert [s.path for s in forwarded(fake)] == [CHAT_PATH]
    assert fake.requests_to("/tokenize") == []


def test_cl_te_smuggling_is_refused_and_nothing_after_it_is_read(
    fake: FakeVLLM, server: ProxyServer
) -> None:
    # Classic CL.TE: a front end using Content-Length would pass the whole thing as one body; a
    # back end using chunked would see a second request. Either reading is refused.
    hidden = b"0\r\n\r\n" + request(BODY)
    data = request(
        hidden,
        length=False,
        headers=[("Content-Length", str(len(hidden))), ("Transfer-Encoding", "chunked")],
    )
    assert refused(server, data)["code"] == "malformed_request"
    assert forwarded(fake) == []


def test_bad_request_after_a_good_one_keeps_its_answer(fake: FakeVLLM, server: ProxyServer) -> None:
    # The first request was read whole before the bad bytes: it is answered, then the
    # connection closes; the bad one is never served.
    slow = chat_body(fake={"first_byte_delay": 0.3})
    with Conn(server.port) as conn:
        conn.send(
            request(slow) + b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n"
        )
        assert conn.response().status == 200
        assert conn.closed(within=3)
        assert conn.buffer == b""
    assert len(forwarded(fake)) == 1


# -- head limits (default: 64 KiB, 100 fields) --------------------------------------------------


def test_huge_header_is_431_before_the_head_ends(fake: FakeVLLM, server: ProxyServer) -> None:
    with Conn(server.port) as conn:
        conn.send(request(BODY)[:40] + b"X-Pad: ")
        # Never finish the head: the refusal must come from the size, not from parsing it.
        for _ in range(100):
            try:
                conn.send(b"a" * 4096)
            except OSError:
                break  # closed under us: the answer is already waiting
        response = conn.response(within=5)
        assert response.status == 431
        assert response.error()["code"] == "request_headers_too_large"
        assert conn.closed()
    assert forwarded(fake) == []


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([("X-Pad", "a" * (60 * 1024))], 200),
        ([("X-Pad", "a" * (65 * 1024))], 431),
        ([("Authorization", "Bearer " + "k" * 8192)], 200),
        ([(f"X-H{i}", "v") for i in range(90)], 200),
        ([(f"X-H{i}", "v") for i in range(101)], 431),
        ([("X-Same", "v")] * 101, 431),
    ],
    ids=["60KiB-header", "65KiB-header", "8KiB-key", "90-headers", "101-headers", "101-same"],
)
def test_head_limits(
    fake: FakeVLLM, server: ProxyServer, headers: list[tuple[str, str]], status: int
) -> None:
    data = request(BODY, headers=headers)
    if status == 200:
        with Conn(server.port) as conn:
            conn.send(data)
            assert conn.response().status == 200
        assert len(forwarded(fake)) == 1
    else:
        assert refused(server, data, 431)["code"] == "request_headers_too_large"
        assert forwarded(fake) == []


# -- upgrades and methods ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        request(
            BODY,
            headers=[
                ("Connection", "Upgrade, HTTP2-Settings"),
                ("Upgrade", "h2c"),
                ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ],
        ),
        request(
            method="GET",
            target="/v1/models",
            length=False,
            headers=[
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
        ),
        b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n",
    ],
    ids=["h2c", "websocket", "CONNECT"],
)
def test_upgrades_and_connect_are_refused(fake: FakeVLLM, server: ProxyServer, data: bytes) -> None:
    assert refused(server, data)["code"] == "malformed_request"
    assert forwarded(fake) == []


def test_upgrade_header_without_connection_upgrade_is_just_a_header(
    fake: FakeVLLM, server: ProxyServer
) -> None:
    with Conn(server.port) as conn:
        conn.send(request(BODY, headers=[("Upgrade", "h2c")]))
        assert conn.response().status == 200
    (seen,) = forwarded(fake)
    assert "upgrade" not in seen.headers


# -- the connection limit ------------------------------------------------------------------------


SLOW = chat_body(fake={"first_byte_delay": 0.4})


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_exactly_max_concurrency_connections_and_requests_are_served(
    fake: FakeVLLM, proxy: ProxyFactory, limit: int
) -> None:
    # server.max_concurrency counts open connections and requests in flight: `limit` of each
    # are served, the first one above it is refused.
    port = int(proxy(server={"max_concurrency": limit}).rsplit(":", 1)[1])
    conns = [Conn(port) for _ in range(limit)]
    try:
        for conn in conns:
            conn.send(request(method="GET", target="/health"))
        assert [conn.response().status for conn in conns] == [200] * limit
        for conn in conns:  # `limit` requests at once, on `limit` connections
            conn.send(request(SLOW))
        with Conn(port) as extra:  # one connection more, while they are in flight
            extra.send(request(method="GET", target="/health"))
            response = extra.response()
            assert response.status == 503
            assert response.error()["code"] == "overloaded"
            assert response.headers["retry-after"] == "1"
            assert extra.closed()
        assert [conn.response().status for conn in conns] == [200] * limit
    finally:
        for conn in conns:
            conn.close()
    assert len(forwarded(fake)) == limit


def test_a_keep_alive_client_at_the_limit_is_served_request_after_request(
    fake: FakeVLLM, proxy: ProxyFactory
) -> None:
    # An answered request's task lingers a moment after its response: not a request in flight.
    port = int(proxy(server={"max_concurrency": 1}).rsplit(":", 1)[1])
    with Conn(port) as conn:
        for i in range(30):
            conn.send(request(BODY) if i % 2 else request(method="GET", target="/health"))
            assert conn.response().status == 200, i


def test_connection_limit_overflow_is_an_openai_503(fake: FakeVLLM, proxy: ProxyFactory) -> None:
    port = int(proxy(server={"max_concurrency": 2}).rsplit(":", 1)[1])
    with Conn(port), Conn(port), Conn(port) as conn:
        conn.send(request(BODY))
        response = conn.response()
        assert response.status == 503
        assert response.error()["code"] == "overloaded"
        assert response.headers["retry-after"] == "1"
        assert conn.closed()
    assert forwarded(fake) == []


def test_refusals_are_counted_by_reason(fake: FakeVLLM, server: ProxyServer) -> None:
    metrics: ProxyMetrics = server.app.state.metrics

    def count(reason: str) -> float:
        child = metrics.http_refused._children.get((reason,))
        return child.value if child is not None else 0.0

    before = {r: count(r) for r in ("malformed", "headers_too_large", "upgrade")}
    refused(server, FRAMING["two-different-content-lengths"])
    refused(server, request(BODY, headers=[("X-Pad", "a" * (65 * 1024))]), 431)
    refused(server, request(BODY, headers=[("Connection", "Upgrade"), ("Upgrade", "h2c")]))
    assert {r: count(r) - n for r, n in before.items()} == {
        "malformed": 1,
        "headers_too_large": 1,
        "upgrade": 1,
    }
    text = metrics.registry.render().decode()
    assert 'vgate_http_refused_total{reason="malformed"}' in text


# -- HTTP/1.0 clients (a proxy in front speaking 1.0) ---------------------------------------------


def http10(data: bytes) -> bytes:
    return data.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)


def until_close(conn: Conn) -> tuple[int, dict[str, str], bytes]:
    """A response read to the end of the connection: (status, headers, body as sent)."""
    head = conn._until(b"\r\n\r\n", time.monotonic() + 10).decode("latin-1")
    assert conn.closed(within=10), "the connection stayed open"
    line, *lines = head.split("\r\n")
    headers = {}
    for raw in lines:
        name, _, value = raw.partition(":")
        assert name.strip().lower() not in headers, f"{name} twice"
        headers[name.strip().lower()] = value.strip()
    return int(line.split(" ")[1]), headers, conn.buffer


@pytest.mark.parametrize("keep_alive", [False, True], ids=["plain", "keep-alive-asked"])
def test_a_stream_to_an_http10_client_is_framed_by_the_close(
    server: ProxyServer, keep_alive: bool
) -> None:
    extra = [("Connection", "keep-alive")] if keep_alive else []
    with Conn(server.port) as conn:
        conn.send(http10(request(chat_body(stream=True, max_tokens=5), headers=extra)))
        status, headers, body = until_close(conn)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert "transfer-encoding" not in headers  # HTTP/1.0 has no chunked coding
    assert "content-length" not in headers
    assert headers["connection"] == "close"
    assert body.startswith(b"data: {")  # the events themselves, no chunk sizes
    assert body.endswith(b"data: [DONE]\n\n")
    assert body.count(b"data: ") == 5 + 2  # the role delta, 5 tokens, [DONE]


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (request(BODY), 200),
        (request(method="GET", target="/health"), 200),
        (request(method="GET", target="/v1/models"), 200),
        (request(method="GET", target="/nowhere"), 404),
        (request(b"{not json"), 400),
    ],
    ids=["completion", "health", "models", "not-found", "bad-json"],
)
@pytest.mark.parametrize("keep_alive", [False, True], ids=["plain", "keep-alive-asked"])
def test_a_whole_answer_to_an_http10_client_has_its_length(
    server: ProxyServer, data: bytes, status: int, keep_alive: bool
) -> None:
    if keep_alive:
        data = data.replace(b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n", 1)
    with Conn(server.port) as conn:
        conn.send(http10(data))
        got, headers, body = until_close(conn)
    assert got == status
    assert "transfer-encoding" not in headers
    assert int(headers["content-length"]) == len(body)
    # Keep-alive is never offered to 1.0: the proxy closes after every answer.
    assert headers["connection"] == "close"
