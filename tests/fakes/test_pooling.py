"""The fake's pooling routes (embeddings, score, rerank), raw and with the real `openai` SDK."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.fakes.vllm import FakeVLLM

EMBED = "/v1/embeddings"
USAGE_KEYS = [
    "prompt_tokens",
    "total_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
]


@pytest.fixture
def client(fake: FakeVLLM) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.base_url, timeout=10) as c:
        yield c


def floats(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_embeddings_float_and_base64_agree(client: httpx.Client) -> None:
    plain = client.post(EMBED, json={"model": "tiny", "input": "Hello world"}).json()
    assert list(plain) == ["id", "object", "created", "model", "data", "usage"]
    assert plain["id"].startswith("embd-") and plain["object"] == "list"
    (item,) = plain["data"]
    assert list(item) == ["index", "object", "embedding"]
    vector = item["embedding"]
    assert len(vector) == 128
    assert abs(sum(v * v for v in vector) - 1.0) < 1e-5
    assert list(plain["usage"]) == USAGE_KEYS and plain["usage"]["completion_tokens"] == 0
    packed = client.post(
        EMBED,
        json={"model": "tiny", "input": ["Hello world", "other"], "encoding_format": "base64"},
    ).json()
    assert [d["index"] for d in packed["data"]] == [0, 1]
    assert floats(packed["data"][0]["embedding"]) == vector  # exactly: float32 both ways
    assert floats(packed["data"][1]["embedding"]) != vector


def test_embedding_inputs(client: httpx.Client) -> None:
    def embed(given: object) -> httpx.Response:
        return client.post(EMBED, json={"model": "tiny", "input": given})

    assert len(embed([0, 4, 205]).json()["data"]) == 1
    assert embed([0, 4, 205]).json()["usage"]["prompt_tokens"] == 3
    assert len(embed([[0, 4, 205], [0, 5]]).json()["data"]) == 2
    assert len(embed(["a", "b", "c"]).json()["data"]) == 3
    empty = embed([])
    assert (empty.status_code, empty.json()["error"]["message"]) == (
        400,
        "You must pass at least one prompt",
    )
    long = embed(" ".join(["word"] * 2100))
    assert (long.status_code, long.json()["error"]["param"]) == (400, "input_tokens")
    unknown = client.post(EMBED, json={"model": "x", "input": "a"})
    assert (unknown.status_code, unknown.json()) == (
        404,
        {
            "error": {
                "message": "The model `x` does not exist.",
                "type": "NotFoundError",
                "param": None,
                "code": 404,
            }
        },
    )
    dims = client.post(EMBED, json={"model": "tiny", "input": "a", "dimensions": 8})
    assert "does not support Matryoshka embeddings" in dims.json()["error"]["message"]


def test_embeddings_as_bytes(client: httpx.Client) -> None:
    r = client.post(EMBED, json={"model": "tiny", "input": ["a", "b"], "encoding_format": "bytes"})
    assert r.headers["content-type"] == "application/octet-stream"
    meta = json.loads(r.headers["metadata"])
    assert [(d["start"], d["end"], d["shape"]) for d in meta["data"]] == [
        (0, 512, [128]),
        (512, 1024, [128]),
    ]
    assert len(r.content) == 1024


def test_openai_sdk_embeddings(fake: FakeVLLM) -> None:
    with openai.OpenAI(base_url=f"{fake.base_url}/v1", api_key="k", max_retries=0) as sdk:
        as_floats = sdk.embeddings.create(
            model="tiny", input=["Hello", "there"], encoding_format="float"
        )
        decoded = sdk.embeddings.create(
            model="tiny", input=["Hello", "there"]
        )  # base64 on the wire
    assert [d.embedding for d in decoded.data] == [d.embedding for d in as_floats.data]
    assert len(as_floats.data[0].embedding) == 128
    assert decoded.usage.prompt_tokens == as_floats.usage.prompt_tokens
    assert fake.completions[-1].body.get("encoding_format") == "base64"


def test_score_and_rerank(client: httpx.Client) -> None:
    docs = ["Paris is the capital.", "Bananas are yellow.", "France"]
    query = "What is the capital of France?"
    scored = client.post("/v1/score", json={"model": "tiny", "text_1": query, "text_2": docs})
    body = scored.json()
    assert list(body) == ["id", "object", "created", "model", "data", "usage"]
    assert body["id"].startswith("score-")
    assert [list(d) for d in body["data"]] == [["index", "object", "score"]] * 3
    same = client.post("/score", json={"model": "tiny", "queries": query, "documents": docs})
    assert [d["score"] for d in same.json()["data"]] == [d["score"] for d in body["data"]]
    ranked = client.post(
        "/v1/rerank", json={"model": "tiny", "query": query, "documents": docs, "top_n": 2}
    ).json()
    assert list(ranked) == ["id", "model", "usage", "results"]
    assert list(ranked["usage"]) == ["prompt_tokens", "total_tokens"]
    best = sorted(body["data"], key=lambda d: d["score"], reverse=True)[:2]
    assert [(r["index"], r["relevance_score"]) for r in ranked["results"]] == [
        (d["index"], d["score"]) for d in best
    ]
    assert ranked["results"][0]["document"] == {"text": docs[best[0]["index"]], "multi_modal": None}
    every = client.post("/v2/rerank", json={"model": "tiny", "query": query, "documents": docs})
    assert len(every.json()["results"]) == 3
    missing = client.post("/v1/rerank", json={"model": "tiny", "documents": docs})
    assert (missing.status_code, missing.json()["error"]["param"]) == (400, "body.query")


def test_runner_decides_the_routes() -> None:
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    with FakeVLLM(runner="pooling") as fake, httpx.Client(base_url=fake.base_url) as c:
        assert c.post(EMBED, json={"model": "tiny", "input": "a"}).status_code == 200
        for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages"):
            r = c.post(path, json=chat)
            assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    with FakeVLLM(runner="generate") as fake, httpx.Client(base_url=fake.base_url) as c:
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
        assert c.post(EMBED, json={"model": "tiny", "input": "a"}).status_code == 404
