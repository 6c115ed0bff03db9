"""What reaches the engine, over real sockets: scenarios 26, 27, 31, 32, 33, 36, and internal
errors. The fake records every request it gets; "nothing forwarded" is read from that record.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator

import orjson
import pytest

from proxy.core.pipeline import ProxyRequest, ProxyResponse
from proxy.runtime.runtime import Runtime
from proxy.upstream.forward import Forwarder
from tests.fakes.harness import ProxyServer
from tests.fakes.vllm import FakeVLLM
from tests.security.conftest import forwarded
from tests.security.raw import CHAT_PATH, Conn, chat_body, chunked, request

BODY = chat_body()
MB = 1024 * 1024


# -- 31: hop-by-hop and host headers ----------------------------------------------------------


def test_hop_by_hop_and_host_headers_never_reach_the_engine(
    fake: FakeVLLM, server: ProxyServer
) -> None:
    hostile = [
        ("Connection", "keep-alive, X-Secret, Keep-Alive"),
        ("Keep-Alive", "timeout=99"),
        ("TE", "trailers"),
        ("Trailer", "X-Trail"),
        ("Upgrade", "h2c"),  # without "Connection: upgrade", a plain (hop-by-hop) header
        ("Proxy-Authorization", "Basic c2VjcmV0"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Secret", "must-not-leak"),
        ("X-Forwarded-Host", "evil.test"),
        ("X-Forwarded-For", "10.6.6.6"),
        ("Forwarded", "for=10.6.6.6;host=evil.test;proto=https"),
        ("X-Host", "evil.test"),
        ("X-Original-URL", "/tokenize"),
        ("X-Rewrite-URL", "/tokenize"),
        ("Authorization", "Bearer sk-client-secret"),
        ("Cookie", "session=abc"),
    ]
    with Conn(server.port) as conn:
        conn.send(request(BODY, host="evil.test:6666", headers=hostile))
        assert conn.response().status == 200
    (seen,) = forwarded(fake)
    assert seen.path == CHAT_PATH
    assert seen.headers["host"] == f"127.0.0.1:{fake.port}"
    for name, _ in hostile:
        if name != "Connection":
            assert name.lower() not in seen.headers, name
    assert seen.headers.get("connection", "keep-alive") == "keep-alive"
    text = str(seen.headers)
    for word in ("evil", "secret", "6.6.6", "tokenize", "c2VjcmV0", "session"):
        assert word not in text, word


# -- 26: nothing in the request chooses the outbound host ---------------------------------------


def test_body_and_headers_cannot_redirect_the_request(
    fake: FakeVLLM, fresh_fake: FakeVLLM, server: ProxyServer
) -> None:
    attacker = fresh_fake.base_url
    body = chat_body(
        api_base=attacker + "/v1",
        base_url=attacker,
        api_key="sk-attacker",
        api_host=attacker,
        url=attacker + "/v1/chat/completions",
        extra_headers={"Host": "evil.test"},
    )
    headers = [
        ("X-Forwarded-Host", f"127.0.0.1:{fresh_fake.port}"),
        ("Forwarded", f"host={attacker}"),
    ]
    with Conn(server.port) as conn:
        # An absolute-form target names the attacker too: only its path counts.
        conn.send(request(body, target=attacker + CHAT_PATH, headers=headers))
        assert conn.response().status == 200
    assert fresh_fake.seen.connections == 0
    (seen,) = forwarded(fake)
    assert seen.headers["host"] == f"127.0.0.1:{fake.port}"
    assert "authorization" not in seen.headers  # the engine key is the proxy's (none here)


# -- 27: the engine's other endpoints are not reachable -----------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/tokenize",
        "/detokenize",
        "/metrics",
        "/health/../metrics",
        "/v1/models/",
        "//v1/models",
        "/V1/models",
        "/v1/%2e%2e/metrics",
        "/v1/models%2f..%2f..%2fmetrics",
        "/version",
        "/v1/load_lora_adapter",
    ],
)
def test_get_on_anything_but_the_api_is_404(
    fake: FakeVLLM, server: ProxyServer, target: str
) -> None:
    # POSTs to such paths are covered in tests/proxy; GETs take Starlette's router instead.
    with Conn(server.port) as conn:
        conn.send(request(method="GET", target=target, length=False))
        response = conn.response()
    assert response.status == 404, response
    assert response.error()["code"] == "unknown_url"
    assert b"vllm" not in response.body
    assert forwarded(fake) == []


# -- 32 and 33: bodies refused before any upstream call -----------------------------------------


def deep(depth: int) -> bytes:
    return chat_body()[:-1] + b',"x":' + b"[" * depth + b"]" * depth + b"}"


REFUSED = {
    "1025-deep": (deep(1025), 400, None),
    "NaN": (BODY[:-1] + b',"temperature":NaN}', 400, None),
    "Infinity": (BODY[:-1] + b',"temperature":-Infinity}', 400, None),
    "5000-digit-int": (BODY[:-1] + b',"seed":' + b"7" * 5000 + b"}", 400, None),
    "n-1000": (chat_body(n=1000), 400, "n"),
    "100k-messages": (
        orjson.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}] * 100_000}),
        400,
        "messages",
    ),
}


@pytest.mark.parametrize(("body", "status", "param"), REFUSED.values(), ids=REFUSED.keys())
def test_hostile_bodies_are_refused_before_any_upstream_call(
    fake: FakeVLLM, server: ProxyServer, body: bytes, status: int, param: str | None
) -> None:
    with Conn(server.port) as conn:
        conn.send(request(body))
        response = conn.response()
        assert response.status == status
        assert response.error()["param"] == param
        # A refused body leaves the connection in step: the next request is served.
        conn.send(request(BODY))
        assert conn.response().status == 200
    assert len(forwarded(fake)) == 1


def send_in_background(conn: Conn, data: bytes) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(OSError):  # the server may close on an early answer
            conn.send(data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_10mb_body_is_413_and_the_connection_stays_in_step(
    fake: FakeVLLM, server: ProxyServer, framing: str
) -> None:
    big = chat_body(pad="x" * (10 * MB))
    if framing == "chunked":
        data = request(
            chunked(big, 64 * 1024), length=False, headers=[("Transfer-Encoding", "chunked")]
        )
    else:
        data = request(big)
    with Conn(server.port, timeout=20) as conn:
        sender = send_in_background(conn, data)
        response = conn.response(within=20)
        assert response.status == 413
        assert response.error()["code"] == "request_too_large"
        sender.join(20)
        assert not sender.is_alive()
        # The rest of the body was read and dropped: the connection is still in step.
        conn.send(request(BODY))
        assert conn.response(within=20).status == 200
    assert len(forwarded(fake)) == 1


def test_body_under_the_limit_but_over_1mib_is_forwarded_whole(
    fake: FakeVLLM, server: ProxyServer
) -> None:
    # The control for the 413s: 3 MiB is under the default 4 MiB (aiohttp needs it as a file
    # object beyond 1 MiB, or warns; proxy.upstream.client).
    body = chat_body(pad="y" * (3 * MB))
    with Conn(server.port) as conn:
        conn.send(request(body))
        assert conn.response().status == 200
    (seen,) = forwarded(fake)
    assert seen.body["pad"] == "y" * (3 * MB)
    assert seen.headers["content-length"] == str(len(seen.raw))


def test_max_tokens_1e9_is_left_to_the_engine_and_not_retried(
    fake: FakeVLLM, server: ProxyServer
) -> None:
    # Decision: passed through unchanged. vLLM answers 400 (max_tokens > max_model_len; see
    # tests/engine/test_e2e_vllm.py) and a 4xx is relayed as is, never retried; the truncate
    # policy can clamp it instead (clamp_max_tokens). The fake answers as vLLM does.
    message = (
        "max_tokens=1000000000 cannot be greater than max_model_len=2048. "
        "Please request fewer output tokens."
    )
    vllm_400 = {
        "error": {"message": message, "type": "BadRequestError", "param": "max_tokens", "code": 400}
    }
    body = chat_body(max_tokens=10**9, fake={"status": 400, "body": vllm_400})
    with Conn(server.port) as conn:
        conn.send(request(body))
        response = conn.response()
    assert response.status == 400
    assert orjson.loads(response.body) == vllm_400
    (seen,) = forwarded(fake)
    assert seen.body["max_tokens"] == 10**9


# -- 36: engine internals never reach the client -------------------------------------------------

TRACEBACK = (
    'Traceback (most recent call last):\n  File "/opt/vllm/vllm/entrypoints/openai/api_server.py",'
    " line 412, in create_chat_completion\n    raise KeyError('secret-internal')\nKeyError: "
    "'secret-internal' (worker 10.0.0.7:29500)"
)


@pytest.mark.parametrize("stream", [False, True])
def test_engine_500_with_a_traceback_is_replaced(
    fake: FakeVLLM, server: ProxyServer, stream: bool
) -> None:
    body = chat_body(stream=stream, fake={"status": 500, "body": TRACEBACK})
    with Conn(server.port) as conn:
        conn.send(request(body))
        response = conn.response()
    assert response.status == 502
    assert response.error()["code"] == "upstream_server_error"
    for word in ("Traceback", "/opt/", "api_server", "KeyError", "secret", "10.0.0.7"):
        assert word.encode() not in response.body
    assert forwarded(fake)  # it did reach the engine, whose answer was replaced


# -- bugs: an OpenAI-shaped 500, or an error event once a stream started ------------------------


def test_unexpected_exception_before_the_answer_is_an_openai_500(
    fake: FakeVLLM, server: ProxyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Forwarder, request: ProxyRequest) -> ProxyResponse:
        raise RuntimeError("/srv/vgate/secret.py: bug")

    monkeypatch.setattr(Forwarder, "__call__", broken)
    with Conn(server.port) as conn:
        conn.send(request(BODY))
        response = conn.response()
        assert response.status == 500
        assert response.error()["type"] == "server_error"
        assert b"secret" not in response.body and b"RuntimeError" not in response.body
        conn.send(request(method="GET", target="/v1/models", length=False))
        assert conn.response().status == 200  # the connection is still good


def test_unexpected_exception_mid_stream_is_an_error_event(
    fake: FakeVLLM, server: ProxyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def events() -> AsyncIterator[bytes]:
        yield b'data: {"choices": []}\n\n'
        raise RuntimeError("/srv/vgate/secret.py: bug")

    async def broken(self: Forwarder, request: ProxyRequest) -> ProxyResponse:
        return ProxyResponse(200, "text/event-stream", stream=events())

    monkeypatch.setattr(Forwarder, "__call__", broken)
    with Conn(server.port) as conn:
        conn.send(request(chat_body(stream=True)))
        response = conn.response()
    assert response.status == 200
    first, last = response.body.split(b"\n\n")[:2]
    assert first == b'data: {"choices": []}'
    error = orjson.loads(last.removeprefix(b"data: "))["error"]
    assert error["type"] == "server_error"
    assert b"[DONE]" not in response.body
    assert b"secret" not in response.body


def test_unexpected_exception_on_another_route_is_an_openai_500(
    server: ProxyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Runtime) -> dict[str, str]:
        raise RuntimeError("/srv/vgate/secret.py: bug")

    monkeypatch.setattr(Runtime, "readiness", broken)
    with Conn(server.port) as conn:
        conn.send(request(method="GET", target="/ready", length=False))
        response = conn.response()
    assert response.status == 500
    assert response.error()["type"] == "server_error"
    assert b"secret" not in response.body
