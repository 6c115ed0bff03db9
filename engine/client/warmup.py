"""The warm-up generation: what vgate sends an engine before it counts as ready.

An engine answering `/health` has loaded its weights, but its first generations are slow (CUDA
graphs, allocator and kernel caches, the CPU build's first forward pass). So an engine with a
warm-up (`[engines.NAME] warmup`, on by default) is ready only once it has answered one real
short request: `max_tokens` tokens of `prompt` with `ignore_eos` (the tokens are generated
whatever the model says), or for a pooling engine one embedding of `prompt`. The proxy's engine
monitor sends it (readiness in `/ready`, `vgate up`), and so does `vgate systemd wait-healthy`
(the engine unit turns active only after it). The request is built here once; each sender only
carries it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Warmup:
    prompt: str = "Hello"
    max_tokens: int = 8
    timeout: float = 120.0  # seconds for each warm-up request
    # "generate", "embed" or "classify": what the engine serves. A generating engine whose
    # checkpoint turns out to be a pooling model (vLLM's runner "auto") has no
    # /v1/completions: its 404 moves the warm-up on to an embedding.
    kind: str = "generate"


def attempts(warmup: Warmup, served_name: str) -> list[tuple[str, bytes]]:
    """(path, JSON body) of the warm-up requests to try in order, each while the last one's
    route was missing (404)."""
    model, text = served_name, warmup.prompt
    embed = ("/v1/embeddings", orjson.dumps({"model": model, "input": text}))
    if warmup.kind == "embed":
        return [embed]
    if warmup.kind == "classify":
        return [("/classify", orjson.dumps({"model": model, "input": text}))]
    body: dict[str, Any] = {
        "model": model,
        "prompt": text,
        "max_tokens": warmup.max_tokens,
        "ignore_eos": True,  # generate every token: the point is to run the decode path
        "temperature": 0.0,
    }
    return [("/v1/completions", orjson.dumps(body)), embed]


def problem(warmup: Warmup, path: str, status: int, content: bytes) -> str | None:
    """Why an answer to the warm-up request at `path` does not show a warm engine (None: it
    does)."""
    if status != 200:
        return f"{path} answered {status}: {content[:200].decode('utf-8', 'replace')}"
    try:
        answer = orjson.loads(content)
    except orjson.JSONDecodeError:
        return f"{path} answered something that is not JSON"
    if not isinstance(answer, dict):
        return f"{path} answered something that is not a JSON object"
    if path != "/v1/completions":
        data = answer.get("data")
        return None if isinstance(data, list) and data else f"{path} answered no result"
    usage = answer.get("usage")
    made = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if made != warmup.max_tokens:
        return f"{path} generated {made} tokens, not {warmup.max_tokens}"
    return None
