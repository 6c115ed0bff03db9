"""What vLLM's OpenAI server answers, as bytes and dicts: the fake's (and tests') source of truth.

Generated text is deterministic (`token_text`), so a test can predict a whole answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson

# Multi-byte UTF-8 on purpose: splitting the stream at every byte offset must cut inside them.
_WORDS = ["Hello", " wörld", ",", " 日本語", " 🙂", " the", " quick", " fox", " ß", " end"]


def token_text(i: int) -> str:
    """The i-th generated token (deterministic, so tests can predict the whole answer)."""
    return _WORDS[i % len(_WORDS)]


def answer_text(tokens: int) -> str:
    return "".join(token_text(i) for i in range(tokens))


def prompt_tokens(body: dict[str, Any]) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word, plus 4 per chat turn."""
    if isinstance(body.get("messages"), list):
        count = 0
        for m in body["messages"]:
            content = m.get("content") if isinstance(m, dict) else None
            count += 4 + (len(content.split()) if isinstance(content, str) else 0)
        return count + 2
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return 1 + len(prompt.split())
    if isinstance(prompt, list):
        return len(prompt)
    return 0


def sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def stream_events(body: dict[str, Any], chat: bool, tokens: int, rid: str) -> Iterator[bytes]:
    """vLLM's SSE events for one request (without the final [DONE])."""
    created = int(time.time())
    model = body.get("model")
    n = body.get("n") or 1
    if chat:
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        for index in range(n):
            delta = {"role": "assistant", "content": ""}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
            yield sse({**head, "choices": [choice]})
    else:
        head = {"id": rid, "object": "text_completion", "created": created, "model": model}
    for i in range(tokens):
        last = i == tokens - 1
        for index in range(n):
            finish = "length" if last else None
            if chat:
                choice = {
                    "index": index,
                    "delta": {"content": token_text(i)},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            else:
                choice = {
                    "index": index,
                    "text": token_text(i),
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
            yield sse({**head, "choices": [choice]})
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        p = prompt_tokens(body)
        usage = {
            "prompt_tokens": p,
            "total_tokens": p + tokens * n,
            "completion_tokens": tokens * n,
        }
        yield sse({**head, "choices": [], "usage": usage})


def whole_answer(body: dict[str, Any], chat: bool, tokens: int, rid: str) -> dict[str, Any]:
    n = body.get("n") or 1
    text = answer_text(tokens)
    p = prompt_tokens(body)
    usage = {"prompt_tokens": p, "total_tokens": p + tokens * n, "completion_tokens": tokens * n}
    if chat:
        choices: list[dict[str, Any]] = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
            for i in range(n)
        ]
        kind = "chat.completion"
    else:
        choices = [
            {
                "index": i,
                "text": text,
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
            for i in range(n)
        ]
        kind = "text_completion"
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": choices,
        "usage": usage,
        "prompt_logprobs": None,
    }


def error_body(message: str, kind: str, code: int, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})
