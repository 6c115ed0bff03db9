"""The pooling routes of the fake: embeddings, score and rerank, shaped as vLLM 0.32.0 answers
them for a `--runner pooling --convert embed` model (score and rerank are then the cosine
similarity of the two embeddings).

Embeddings are deterministic per input: L2-normalized float32 vectors seeded by the text, so the
float and base64 encodings of one input decode to exactly the same numbers, as vLLM's do.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import struct
import time
import uuid
from typing import TYPE_CHECKING, Any

from tests.fakes.record import Seen
from tests.fakes.replies import Fault, Reply, Whole, json_reply
from tests.fakes.shapes import error_body, missing_field, usage

if TYPE_CHECKING:
    from tests.fakes.vllm import FakeVLLM

_FORMATS = ("float", "base64", "bytes", "bytes_only")
# The field pairs /v1/score accepts, one request model each in vLLM.
_SCORE_PAIRS = [("text_1", "text_2"), ("queries", "documents"), ("queries", "items")]
_SCORE_PAIRS.append(("data_1", "data_2"))


def embedding(text: str, dims: int) -> list[float]:
    """The fake's embedding of `text`: unit length, every value exactly a float32."""
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    values = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = sum(v * v for v in values) ** 0.5
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *(v / norm for v in values))))


def cosine(a: list[float], b: list[float]) -> float:
    """Of two unit vectors, as float32 (what vLLM's score is)."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return float(struct.unpack("<f", struct.pack("<f", dot))[0])


def _tokens(text: str) -> int:
    return 1 + len(text.split())  # the stand-in tokenizer, BOS included


def _inputs(given: Any) -> list[tuple[str, int]]:
    """(text, tokens) per input: a string, a list of strings, token ids, or lists of token ids."""
    if isinstance(given, str):
        return [(given, _tokens(given))]
    if isinstance(given, list) and given and all(isinstance(t, int) for t in given):
        return [(repr(given), len(given))]
    if isinstance(given, list):
        return [item for g in given if isinstance(g, str | list) for item in _inputs(g)]
    return []


def _too_long(count: int, limit: int) -> Whole:
    message = (
        f"This model's maximum context length is {limit} tokens. However, your prompt contains "
        f"at least {limit + 1} input tokens, which exceeds this limit even without any output "
        f"tokens. Please reduce the length of the input prompt. "
        f"(parameter=input_tokens, value={limit + 1})"
    )
    return Whole(400, error_body(message, "BadRequestError", 400, "input_tokens"))


def _model_check(fake: FakeVLLM, body: dict[str, Any]) -> Whole | None:
    if body.get("model") == fake.model:
        return None
    # The pooling routes word it differently from the generate ones (no aliases, param null).
    message = f"The model `{body.get('model')}` does not exist."
    return Whole(404, error_body(message, "NotFoundError", 404))


def embeddings(fake: FakeVLLM, seen: Seen, body: dict[str, Any], fault: Fault) -> Reply:
    """POST /v1/embeddings."""
    if "input" not in body and "messages" not in body:
        return Whole(400, missing_field("input", body))
    rejected = _model_check(fake, body)
    if rejected is not None:
        return rejected
    fmt = body.get("encoding_format") or "float"
    if fmt not in _FORMATS:
        detail = {"type": "literal_error", "loc": "body.encoding_format", "input": fmt}
        detail["msg"] = "Input should be 'float', 'base64', 'bytes' or 'bytes_only'"
        message = f"1 validation error:\n  {detail!r}"
        return Whole(400, error_body(message, "Bad Request", 400, "body.encoding_format"))
    if body.get("dimensions") is not None:
        message = (
            f"Model '{fake.model}' does not support Matryoshka embeddings; dimensions must be "
            f"unset (received dimensions={body['dimensions']})."
        )
        return Whole(400, error_body(message, "BadRequestError", 400))
    if "input" in body:
        items = _inputs(body["input"])
    else:
        text = json.dumps(body["messages"])
        items = [(text, 4 * len(body["messages"]) + 2)]
    if not items:
        return Whole(400, error_body("You must pass at least one prompt", "BadRequestError", 400))
    for _, count in items:
        if count > fake.max_model_len:
            return _too_long(count, fake.max_model_len)
    vectors = [embedding(text, fake.embedding_dims) for text, _ in items]
    prompt = sum(count for _, count in items)
    rid, created = f"embd-{uuid.uuid4().hex[:16]}", int(time.time())
    if fmt in ("bytes", "bytes_only"):
        return _bytes_answer(fake, body, fmt, vectors, rid, created, prompt)
    data = [
        {"index": i, "object": "embedding", "embedding": _encode(v, fmt)}
        for i, v in enumerate(vectors)
    ]
    answer = {"id": rid, "object": "list", "created": created, "model": body.get("model")}
    return json_reply({**answer, "data": data, "usage": usage(prompt, 0)})


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _bytes_answer(
    fake: FakeVLLM,
    body: dict[str, Any],
    fmt: str,
    vectors: list[list[float]],
    rid: str,
    created: int,
    prompt: int,
) -> Whole:
    """`bytes`: raw float32 with the layout in a `metadata` header (`bytes_only`: without)."""
    size = 4 * fake.embedding_dims
    items = [
        {"index": i, "embed_dtype": "float32", "endianness": "native"}
        | {"start": i * size, "end": (i + 1) * size, "shape": [fake.embedding_dims]}
        for i in range(len(vectors))
    ]
    raw = b"".join(struct.pack(f"={len(v)}f", *v) for v in vectors)
    meta = {"id": rid, "created": created, "model": body.get("model"), "data": items}
    meta["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
    headers = () if fmt == "bytes_only" else (("metadata", json.dumps(meta)),)
    return Whole(200, raw, "application/octet-stream", headers)


def _pairs(left: Any, right: Any) -> list[tuple[str, str]] | None:
    lefts = [left] if isinstance(left, str) else list(left)
    rights = [right] if isinstance(right, str) else list(right)
    if len(lefts) == 1:
        lefts = lefts * len(rights)
    if len(lefts) != len(rights):
        return None
    return list(zip(lefts, rights, strict=True))


def _score_texts(doc: Any) -> str:
    return doc.get("text", "") if isinstance(doc, dict) else str(doc)


def score(fake: FakeVLLM, seen: Seen, body: dict[str, Any], fault: Fault) -> Reply:
    """POST /v1/score (and /score)."""
    names = next(((a, b) for a, b in _SCORE_PAIRS if a in body and b in body), None)
    if names is None:
        return Whole(400, missing_field("queries", body))
    rejected = _model_check(fake, body)
    if rejected is not None:
        return rejected
    pairs = _pairs(body[names[0]], body[names[1]])
    if pairs is None:
        message = "The number of queries and documents must be equal (or one query)."
        return Whole(400, error_body(message, "BadRequestError", 400))
    dims = fake.embedding_dims
    data = [
        {"index": i, "object": "score", "score": cosine(embedding(q, dims), embedding(d, dims))}
        for i, (q, d) in enumerate((_score_texts(q), _score_texts(d)) for q, d in pairs)
    ]
    prompt = sum(_tokens(_score_texts(q)) + _tokens(_score_texts(d)) for q, d in pairs)
    answer = {"id": f"score-{uuid.uuid4().hex[:16]}", "object": "list", "created": int(time.time())}
    answer.update(model=body.get("model"), data=data, usage=usage(prompt, 0))
    return json_reply(answer)


def rerank(fake: FakeVLLM, seen: Seen, body: dict[str, Any], fault: Fault) -> Reply:
    """POST /v1/rerank (and /rerank, /v2/rerank): documents by relevance, best first."""
    for name in ("query", "documents"):
        if name not in body:
            return Whole(400, missing_field(name, body))
    rejected = _model_check(fake, body)
    if rejected is not None:
        return rejected
    docs = body["documents"] if isinstance(body["documents"], list) else [body["documents"]]
    query = embedding(_score_texts(body["query"]), fake.embedding_dims)
    scores = [cosine(query, embedding(_score_texts(d), fake.embedding_dims)) for d in docs]
    ranked = sorted(range(len(docs)), key=lambda i: scores[i], reverse=True)
    results = [
        {
            "index": i,
            "document": {"text": _score_texts(docs[i]), "multi_modal": None},
            "relevance_score": scores[i],
        }
        for i in ranked
    ]
    top_n = int(body.get("top_n") or 0)
    if 0 < top_n < len(results):
        results = results[:top_n]
    q = _tokens(_score_texts(body["query"]))
    prompt = sum(q + _tokens(_score_texts(doc)) for doc in docs)
    return json_reply(
        {
            "id": f"score-{uuid.uuid4().hex[:16]}",
            "model": body.get("model"),
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
            "results": results,
        }
    )
