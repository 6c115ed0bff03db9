"""The fake against the real engine: the same requests to both, the same shapes back.

Values differ (the real model talks nonsense, ids are random), so bodies are compared by
`shape` (keys in order, value types); error answers, which carry no randomness, byte for byte.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.fakes.sse_read import shape, typed_events
from tests.fakes.vllm import FakeVLLM
from tests.proxy.helpers import events
from tests.vllm_fixtures import EMBED_NAME, VllmServer

pytestmark = pytest.mark.vllm
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def fake_engine() -> Iterator[FakeVLLM]:
    # As the session's real engine runs: the hermes tool parser, the Responses store on.
    with FakeVLLM(runner="generate", tool_parser="hermes", responses_store=True) as fake:
        yield fake


def both(fake: FakeVLLM, real: VllmServer, method: str, path: str, body: Any = None) -> list[Any]:
    out = []
    for url in (fake.base_url, real.base_url):
        r = httpx.request(method, url + path, json=body, timeout=60)
        out.append(r)
    return out


def collapsed(names: list[str]) -> list[str]:
    """Event names with runs of one name folded: the real detokenizer merges some tokens."""
    return [name for name, _ in itertools.groupby(names)]


def by_type(got: list[tuple[str, Any]]) -> dict[str, Any]:
    """The shape of the first event of each type."""
    first: dict[str, Any] = {}
    for name, data in got:
        first.setdefault(name, shape(data))
    return first


def test_errors_byte_for_byte(fake_engine: FakeVLLM, vllm_server: VllmServer) -> None:
    responses = {"model": "tiny", "input": "Hi", "max_output_tokens": 3}
    cases: list[tuple[str, str, Any]] = [
        ("GET", "/v1/responses/resp_nope", None),
        ("POST", "/v1/responses/resp_nope/cancel", None),
        ("POST", "/v1/responses", {**responses, "previous_response_id": "resp_nope"}),
        ("POST", "/v1/responses", {**responses, "model": "gpt-4"}),
        ("POST", "/v1/responses", {"model": "tiny"}),
        ("POST", "/v1/responses", {**responses, "max_output_tokens": 5000}),
        ("POST", "/v1/messages", {"model": "gpt-4", "max_tokens": 2, "messages": HELLO}),
        ("POST", "/v1/messages", {"model": "tiny", "messages": HELLO}),
        ("POST", "/v1/messages/count_tokens", {"model": "gpt-4", "messages": HELLO}),
        ("POST", "/v1/chat/completions", {"model": "gpt-4", "max_tokens": 2, "messages": HELLO}),
        ("GET", "/v1/models/tiny", None),
        ("POST", "/v1/embeddings", {"model": "tiny", "input": "a"}),  # not on a generate engine
    ]
    for method, path, body in cases:
        fake, real = both(fake_engine, vllm_server, method, path, body)
        assert (fake.status_code, fake.content) == (real.status_code, real.content), (path, body)


def test_responses_shapes(fake_engine: FakeVLLM, vllm_server: VllmServer) -> None:
    body = {"model": "tiny", "input": "Hello there", "max_output_tokens": 3}
    fake, real = (r.json() for r in both(fake_engine, vllm_server, "POST", "/v1/responses", body))
    assert real["status"] == "incomplete"  # the random model does not stop by itself
    assert shape(fake) == shape(real)
    fake_s, real_s = both(
        fake_engine, vllm_server, "POST", "/v1/responses", {**body, "stream": True}
    )
    assert fake_s.headers["content-type"] == real_s.headers["content-type"]
    got, want = typed_events(fake_s.content), typed_events(real_s.content)
    assert collapsed([n for n, _ in got]) == collapsed([n for n, _ in want])
    assert [d["sequence_number"] for _, d in got] == list(range(len(got)))
    assert [d["sequence_number"] for _, d in want] == list(range(len(want)))
    assert by_type(got) == by_type(want)


def test_messages_shapes(fake_engine: FakeVLLM, vllm_server: VllmServer) -> None:
    body = {"model": "tiny", "max_tokens": 3, "messages": HELLO}
    fake, real = (r.json() for r in both(fake_engine, vllm_server, "POST", "/v1/messages", body))
    assert shape(fake) == shape(real)
    fake_s, real_s = both(
        fake_engine, vllm_server, "POST", "/v1/messages", {**body, "stream": True}
    )
    got, want = typed_events(fake_s.content), typed_events(real_s.content)
    assert collapsed([n for n, _ in got]) == collapsed([n for n, _ in want])
    assert by_type(got) == by_type(want)
    count = {"model": "tiny", "messages": HELLO}
    fake_c, real_c = both(fake_engine, vllm_server, "POST", "/v1/messages/count_tokens", count)
    assert shape(fake_c.json()) == shape(real_c.json())


def test_chat_shapes(fake_engine: FakeVLLM, vllm_server: VllmServer) -> None:
    body = {"model": "tiny", "max_tokens": 3, "messages": HELLO}
    fake, real = (
        r.json() for r in both(fake_engine, vllm_server, "POST", "/v1/chat/completions", body)
    )
    fake.pop("system_fingerprint")  # ours names no build
    real.pop("system_fingerprint")
    assert shape(fake) == shape(real)
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    fake_s, real_s = both(fake_engine, vllm_server, "POST", "/v1/chat/completions", streamed)
    got = [orjson.loads(e) for e in events(fake_s.content)[:-1]]
    want = [orjson.loads(e) for e in events(real_s.content)[:-1]]

    def outline(chunk: dict[str, Any]) -> Any:
        # A token may detokenize to nothing yet (half a UTF-8 character): vLLM then sends an
        # empty delta. The delta's keys are checked apart; the rest of the chunk by shape.
        for choice in chunk.get("choices", []):
            assert set(choice.pop("delta")) <= {"role", "content"}
        return shape(chunk)

    # role chunk, a content chunk, the finish chunk, the usage chunk
    assert [outline(c) for c in (got[0], got[1], got[-2], got[-1])] == [
        outline(c) for c in (want[0], want[1], want[-2], want[-1])
    ]


def test_pooling_shapes(vllm_embed_server: VllmServer) -> None:
    pooling_server = vllm_embed_server
    requests: list[tuple[str, Any]] = [
        ("/v1/embeddings", {"model": EMBED_NAME, "input": "Hello world"}),
        ("/v1/embeddings", {"model": EMBED_NAME, "input": ["a", "b"], "encoding_format": "base64"}),
        ("/v1/embeddings", {"model": EMBED_NAME, "input": [[0, 4, 205], [0, 5]]}),
        ("/v1/score", {"model": EMBED_NAME, "text_1": "q", "text_2": ["a", "b"]}),
        (
            "/v1/rerank",
            {"model": EMBED_NAME, "query": "q", "documents": ["a", "b", "c"], "top_n": 2},
        ),
    ]
    with FakeVLLM(model=EMBED_NAME, runner="pooling") as fake:
        for path, body in requests:
            mine, real = both(fake, pooling_server, "POST", path, body)
            assert mine.status_code == real.status_code == 200
            assert shape(mine.json()) == shape(real.json()), path
            if body.get("encoding_format") == "base64":
                sizes = {len(d["embedding"]) for r in (mine, real) for d in r.json()["data"]}
                assert len(sizes) == 1  # same dimension, same float32 packing
        for path, body in [
            ("/v1/embeddings", {"model": "x", "input": "a"}),
            ("/v1/embeddings", {"model": EMBED_NAME, "input": []}),
            ("/v1/chat/completions", {"model": EMBED_NAME, "messages": HELLO, "max_tokens": 2}),
        ]:
            mine, real = both(fake, pooling_server, "POST", path, body)
            assert (mine.status_code, mine.content) == (real.status_code, real.content), path
