"""Request/response and error mapping, with respx standing in for the engine (no sockets)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import respx
from starlette.testclient import TestClient

from proxy.http.app import create_app
from proxy.runtime.load import from_dict

ENGINE = "http://engine.test:8000"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "tiny-served",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hello"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def config(**upstream: Any) -> dict[str, Any]:
    return {
        "upstream": {"health_interval": 60.0, "metrics_interval": 60.0, **upstream},
        "models": {"tiny": {"upstreams": [ENGINE], "served_name": "tiny-served"}},
    }


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    router = respx.MockRouter(base_url=ENGINE, assert_all_called=False)
    router.get("/health").respond(200)
    router.get("/metrics").respond(200, text="")
    router.get("/v1/models").respond(
        200, json={"object": "list", "data": [{"id": "tiny-served", "max_model_len": 2048}]}
    )
    yield router


def client_for(router: respx.MockRouter, data: dict[str, Any]) -> TestClient:
    app = create_app(from_dict(data), transport=httpx.MockTransport(router.async_handler))
    return TestClient(app, raise_server_exceptions=True)


@pytest.fixture
def client(router: respx.MockRouter) -> Iterator[TestClient]:
    with client_for(router, config()) as c:
        yield c


def completions(router: respx.MockRouter) -> list[httpx.Request]:
    """Requests the proxy forwarded (the engine monitor's probes carry no X-Request-ID)."""
    return [c.request for c in router.calls if "x-request-id" in c.request.headers]


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] == code


# -- forwarding ----------------------------------------------------------------------------


def test_answer_relayed_and_model_renamed(router: respx.MockRouter, client: TestClient) -> None:
    router.post("/v1/chat/completions").respond(200, json=ANSWER)
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    assert r.json() == ANSWER
    (sent,) = completions(router)
    assert orjson.loads(sent.content)["model"] == "tiny-served"


def test_unknown_fields_forwarded_untouched(router: respx.MockRouter, client: TestClient) -> None:
    router.post("/v1/completions").respond(200, json=ANSWER)
    extras = {
        "top_k": 5,
        "ignore_eos": True,
        "repetition_penalty": 1.3,
        "guided_json": {"type": "object", "properties": {"a": {"type": "integer"}}},
        "stop": ["\n"],
        "seed": 7,
    }
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", **extras})
    assert r.status_code == 200
    (sent,) = completions(router)
    assert sent.url.path == "/v1/completions"
    body = orjson.loads(sent.content)
    assert {k: body[k] for k in extras} == extras
    assert body["prompt"] == "x"


@pytest.mark.parametrize("field", ["api_base", "base_url", "api_host", "url"])
def test_body_cannot_change_the_outbound_host(
    router: respx.MockRouter, client: TestClient, field: str
) -> None:
    router.post("/v1/chat/completions").respond(200, json=ANSWER)
    r = client.post(
        "/v1/chat/completions",
        json={**CHAT, field: "http://attacker.test:9999/v1"},
        headers={"X-Forwarded-Host": "attacker.test", "X-Host": "attacker.test"},
    )
    assert r.status_code == 200
    (sent,) = completions(router)
    assert (sent.url.scheme, sent.url.host, sent.url.port) == ("http", "engine.test", 8000)
    assert sent.headers["host"] == "engine.test:8000"
    assert "attacker" not in str(dict(sent.headers))


def test_client_authorization_not_forwarded(router: respx.MockRouter, client: TestClient) -> None:
    router.post("/v1/chat/completions").respond(200, json=ANSWER)
    r = client.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={"Authorization": "Bearer sk-client-secret", "Cookie": "session=abc"},
    )
    assert r.status_code == 200
    (sent,) = completions(router)
    assert "authorization" not in sent.headers
    assert "cookie" not in sent.headers


def test_engine_key_is_the_proxys_own(router: respx.MockRouter) -> None:
    router.post("/v1/chat/completions").respond(200, json=ANSWER)
    with client_for(router, config(api_key="sk-engine")) as client:
        r = client.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-client"}
        )
    assert r.status_code == 200
    (sent,) = completions(router)
    assert sent.headers["authorization"] == "Bearer sk-engine"
    assert "sk-engine" not in r.text


def test_engine_upstream_uses_that_engines_key(router: respx.MockRouter) -> None:
    router.post("/v1/chat/completions").respond(200, json=ANSWER)
    data = config(api_key="sk-default")
    data["engines"] = {
        "e": {
            "model": "/models/x",
            "served_name": "tiny-served",
            "host": "engine.test",
            "port": 8000,
            "api_key": "sk-engine-e",
        }
    }
    data["models"] = {"tiny": {"upstreams": ["engine:e"]}}
    with client_for(router, data) as client:
        r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    (sent,) = completions(router)
    assert sent.headers["authorization"] == "Bearer sk-engine-e"
    assert orjson.loads(sent.content)["model"] == "tiny-served"


def test_hop_by_hop_headers_not_forwarded(router: respx.MockRouter, client: TestClient) -> None:
    router.post("/v1/chat/completions").respond(200, json=ANSWER)
    hop = {
        "Connection": "keep-alive, X-Secret",
        "Keep-Alive": "timeout=99",
        "TE": "trailers",
        "Upgrade": "h2c",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "Proxy-Connection": "keep-alive",
        "X-Secret": "must-not-leak",
        "Trailer": "X-Foo",
    }
    r = client.post("/v1/chat/completions", json=CHAT, headers=hop)
    assert r.status_code == 200
    (sent,) = completions(router)
    outbound = {k.lower(): v for k, v in sent.headers.items()}
    for name in hop:
        if name.lower() == "connection":
            continue  # the transport sets its own
        assert name.lower() not in outbound, name
    assert "must-not-leak" not in str(outbound)
    assert "X-Secret" not in outbound.get("connection", "")


def test_upstream_response_headers_do_not_leak(
    router: respx.MockRouter, client: TestClient
) -> None:
    router.post("/v1/chat/completions").respond(
        200,
        json=ANSWER,
        headers={"set-cookie": "engine=1", "server": "uvicorn", "x-internal-node": "gpu-7"},
    )
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    for name in ("set-cookie", "server", "x-internal-node"):
        assert name not in r.headers


def test_request_id_kept_or_made(router: respx.MockRouter, client: TestClient) -> None:
    router.post("/v1/chat/completions").respond(200, json=ANSWER)
    r = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": "trace-1"})
    assert r.headers["x-request-id"] == "trace-1"
    bad = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": "a b\x01"})
    assert bad.headers["x-request-id"] != "a b\x01"
    sent = completions(router)
    assert [s.headers["x-request-id"] for s in sent] == ["trace-1", bad.headers["x-request-id"]]


# -- client errors: 400 / 404 / 413, nothing forwarded --------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", b"{not json", None),
        ("/v1/chat/completions", b"", None),
        ("/v1/chat/completions", b"[1, 2]", None),
        ("/v1/chat/completions", b'"text"', None),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        ("/v1/chat/completions", b'{"model": 3, "messages": []}', "model"),
        ("/v1/chat/completions", b'{"model": "tiny"}', "messages"),
        ("/v1/chat/completions", b'{"model": "tiny", "messages": []}', "messages"),
        ("/v1/chat/completions", b'{"model": "tiny", "messages": ["hi"]}', None),
        ("/v1/completions", b'{"model": "tiny"}', "prompt"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stream": "yes"}', "stream"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": -1}', "max_tokens"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x", "n": 1000}', "n"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x", "n": 0}', "n"),
        (
            "/v1/chat/completions",
            orjson.dumps(
                {"model": "tiny", "messages": [{"role": "user", "content": "x"}] * 10_001}
            ),
            "messages",
        ),
    ],
)
def test_bad_requests_are_400_and_not_forwarded(
    router: respx.MockRouter, client: TestClient, path: str, body: bytes, param: str | None
) -> None:
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    assert r.json()["error"]["type"] == "invalid_request_error"
    if param is not None:
        assert r.json()["error"]["param"] == param
    assert completions(router) == []


def nested(depth: int) -> bytes:
    return b'{"model": "tiny", "prompt": "x", "deep": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    "body",
    [
        nested(1025),
        nested(300),  # orjson reads up to 1024 levels but writes only 254: still a 400
        b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
        b'{"model": "tiny", "prompt": "x", "temperature": Infinity}',
        b'{"model": "tiny", "prompt": "x", "seed": ' + b"9" * 5000 + b"}",
        b'{"model": "tiny", "prompt": "\xff\xfe"}',
    ],
    ids=["1025-deep", "300-deep", "NaN", "Infinity", "5000-digit-int", "invalid-utf8"],
)
def test_hostile_json_is_400_before_any_upstream_call(
    router: respx.MockRouter, client: TestClient, body: bytes
) -> None:
    r = client.post("/v1/completions", content=body)
    assert_openai_error(r, 400)
    assert completions(router) == []


def test_rejected_bodies_never_count_against_the_upstream(
    router: respx.MockRouter, client: TestClient
) -> None:
    router.post("/v1/completions").respond(200, json=ANSWER)
    for _ in range(10):  # more than the breaker's fail_max
        assert client.post("/v1/completions", content=nested(300)).status_code == 400
    assert client.post("/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 200
    assert len(completions(router)) == 1


def test_deep_but_legal_json_is_forwarded(router: respx.MockRouter, client: TestClient) -> None:
    router.post("/v1/completions").respond(200, json=ANSWER)
    r = client.post("/v1/completions", content=nested(200))
    assert r.status_code == 200
    assert len(completions(router)) == 1


def test_unknown_model_is_404(router: respx.MockRouter, client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"})
    assert_openai_error(r, 404, "model_not_found")
    assert r.json()["error"]["param"] == "model"
    assert completions(router) == []


def test_body_over_default_limit_is_413(router: respx.MockRouter, client: TestClient) -> None:
    limit = 4 * 1024 * 1024
    padding = "x" * (limit - 60)
    ok = {"model": "tiny", "prompt": "x", "pad": padding[: limit - 200]}
    router.post("/v1/completions").respond(200, json=ANSWER)
    assert client.post("/v1/completions", json=ok).status_code == 200
    big = orjson.dumps({"model": "tiny", "prompt": "x", "pad": padding + "y" * 100})
    assert len(big) > limit
    r = client.post("/v1/completions", content=big)
    assert_openai_error(r, 413)
    assert len(completions(router)) == 1


def test_body_over_configured_limit_is_413_also_when_streamed(router: respx.MockRouter) -> None:
    data = {**config(), "server": {"max_body_bytes": 1000}}
    router.post("/v1/completions").respond(200, json=ANSWER)

    def chunks() -> Iterator[bytes]:
        # No Content-Length: the limit must hold while reading a chunked body too.
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    with client_for(router, data) as client:
        r = client.post("/v1/completions", content=chunks())
        assert_openai_error(r, 413)
        small = client.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 10})
    assert small.status_code != 413
    assert len(completions(router)) == 1


# -- upstream errors -------------------------------------------------------------------------


def test_upstream_unreachable_is_502(router: respx.MockRouter, client: TestClient) -> None:
    router.post("/v1/chat/completions").mock(side_effect=httpx.ConnectError("refused"))
    r = client.post("/v1/chat/completions", json=CHAT)
    assert_openai_error(r, 502, "upstream_unreachable")


def test_upstream_timeout_is_504(router: respx.MockRouter, client: TestClient) -> None:
    router.post("/v1/chat/completions").mock(side_effect=httpx.ReadTimeout("slow"))
    r = client.post("/v1/chat/completions", json=CHAT)
    assert_openai_error(r, 504, "upstream_timeout")


@pytest.mark.parametrize("status", [400, 401, 404, 422, 429])
def test_upstream_4xx_passed_through_unchanged(
    router: respx.MockRouter, client: TestClient, status: int
) -> None:
    body = (
        b'{"error":{"message":"This model\'s maximum context length is 2048 tokens.",'
        b'"type":"BadRequestError","param":"input_tokens","code":' + str(status).encode() + b"}}"
    )
    router.post("/v1/chat/completions").respond(
        status, content=body, headers={"content-type": "application/json"}
    )
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == status
    assert r.content == body


@pytest.mark.parametrize("status", [500, 502, 503])
def test_upstream_5xx_body_replaced(
    router: respx.MockRouter, client: TestClient, status: int
) -> None:
    leak = 'Traceback (most recent call last):\n  File "/opt/vllm/secret.py", line 1\nKeyError'
    router.post("/v1/chat/completions").respond(status, text=leak)
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code >= 500
    assert_openai_error(r, r.status_code)
    for word in ("Traceback", "secret.py", "KeyError", "/opt/"):
        assert word not in r.text


def test_upstream_5xx_on_a_stream_is_an_error_response(
    router: respx.MockRouter, client: TestClient
) -> None:
    router.post("/v1/chat/completions").respond(500, text="Traceback: boom")
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert_openai_error(r, r.status_code)
    assert r.status_code >= 500
    assert "Traceback" not in r.text


# -- the API surface -------------------------------------------------------------------------


def test_models_lists_configured_names_with_max_model_len(client: TestClient) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    (entry,) = r.json()["data"]
    assert entry["id"] == "tiny"
    assert entry["object"] == "model"
    assert entry["max_model_len"] == 2048


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200


def test_ready_is_503_with_a_reason_when_the_engine_is_down() -> None:
    router = respx.MockRouter(base_url=ENGINE, assert_all_called=False)
    router.route().mock(side_effect=httpx.ConnectError("refused"))
    with client_for(router, config()) as client:
        r = client.get("/ready")
        assert client.get("/health").status_code == 200
    assert r.status_code == 503
    assert "tiny" in r.json()["models"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/chat/completions", 405),
        ("PUT", "/v1/completions", 405),
        ("DELETE", "/v1/models", 405),
        ("POST", "/v1/models", 405),
        ("POST", "/tokenize", 404),
        ("POST", "/detokenize", 404),
        ("GET", "/metrics", 404),
        ("GET", "/version", 404),
        ("GET", "/v1/embeddings", 405),
        ("GET", "/v1/responses", 405),
        ("DELETE", "/v1/responses/resp_1", 405),
        ("POST", "/v1/chat/completions/", 404),
        ("POST", "/v1/chat/completions/batch", 404),
        ("POST", "/v1/chat/completions/render", 404),
        ("POST", "/v1/responses/render", 405),  # the path of GET /v1/responses/{id}
        ("POST", "/v1/messages/render", 404),
        ("GET", "/", 404),
        # vLLM's development, admin and engine-internal routes: never through the public port.
        *(
            ("POST", path, 404)
            for path in (
                "/sleep",
                "/wake_up",
                "/pause",
                "/resume",
                "/collective_rpc",
                "/reset_prefix_cache",
                "/reset_mm_cache",
                "/release_kv_cache_memory",
                "/update_weights",
                "/start_weight_update",
                "/init_weight_transfer_engine",
                "/v1/load_lora_adapter",
                "/v1/unload_lora_adapter",
                "/adapters",
                "/scale_elastic_ep",
                "/start_profile",
                "/abort_requests",
                "/invocations",
                "/inference/v1/generate",
                "/inference/v1/abort_requests",
                "/v1/systemone",
                "/generative_scoring",
                "/pooling",
                "/v2/embed",
                "/v2/rerank",
                "/classify",
            )
        ),
        *(
            ("GET", path, 404)
            for path in (
                "/is_sleeping",
                "/is_paused",
                "/server_info",
                "/tokenizer_info",
                "/load",
                "/kv_event_sources",
                "/weight_info",
                "/get_world_size",
                "/openapi.json",
                "/docs",
                "/ping",
            )
        ),
    ],
)
def test_other_paths_and_methods_are_openai_errors(
    router: respx.MockRouter, client: TestClient, method: str, path: str, status: int
) -> None:
    r = client.request(method, path, json=CHAT)
    assert_openai_error(r, status)
    assert completions(router) == []
    # Only the proxy's own probes of the engine, never the client's request.
    assert {(c.request.method, c.request.url.path) for c in router.calls} <= {
        ("GET", "/health"),
        ("GET", "/metrics"),
        ("GET", "/v1/models"),
    }


def test_models_retrieve_answers_one_configured_model_hub_style_names_too(
    router: respx.MockRouter,
) -> None:
    data = config()
    data["models"]["meta-llama/Llama-3.1-8B"] = {"upstreams": [ENGINE], "served_name": "tiny"}
    with client_for(router, data) as client:
        r = client.get("/v1/models/tiny")
        assert r.status_code == 200
        assert r.json() == {**r.json(), "id": "tiny", "object": "model"}
        # As the OpenAI SDK sends it (the slash encoded), and as curl users type it.
        for path in ("/v1/models/meta-llama%2FLlama-3.1-8B", "/v1/models/meta-llama/Llama-3.1-8B"):
            got = client.get(path)
            assert got.status_code == 200, path
            assert got.json()["id"] == "meta-llama/Llama-3.1-8B"
        for unknown in ("/v1/models/gpt-4", "/v1/models/tiny-served", "/v1/models/meta-llama"):
            assert_openai_error(client.get(unknown), 404, "model_not_found")
        # An encoded slash never splits a segment: this is no path under /v1/models/.
        assert_openai_error(client.get("/v1/models%2Ftiny"), 404, "unknown_url")
    assert completions(router) == []
