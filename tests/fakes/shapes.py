"""What vLLM's OpenAI server answers on chat and completions, as bytes and dicts: the fake's (and
tests') source of truth. Shapes as vLLM 0.32.0 (CPU build) sends them, key order included.

Generated text is deterministic (`token_text`), so a test can predict a whole answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import orjson

# Multi-byte UTF-8 on purpose: splitting the stream at every byte offset must cut inside them.
_WORDS = ["Hello", " wörld", ",", " 日本語", " 🙂", " the", " quick", " fox", " ß", " end"]
FINGERPRINT = "vllm-0.32.0-e7716663"
_NULLS_CHAT_MESSAGE = {"refusal": None, "annotations": None, "audio": None, "function_call": None}


def token_text(i: int, pad: str = "") -> str:
    """The i-th generated token (deterministic, so tests can predict the whole answer).

    `pad` (the `token_padding` fault) follows every token's text.
    """
    return _WORDS[i % len(_WORDS)] + pad


def answer_text(tokens: int, pad: str = "") -> str:
    return "".join(token_text(i, pad) for i in range(tokens))


def prompt_tokens(body: dict[str, Any]) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word, plus 4 per chat turn, and
    for tools (which a chat template renders into the prompt) 4 plus the words of each one's
    JSON."""
    if isinstance(body.get("messages"), list):
        tools = body.get("tools") if isinstance(body.get("tools"), list) else []
        return messages_tokens(body["messages"]) + sum(
            4 + len(json.dumps(tool).split()) for tool in tools
        )
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return 1 + len(prompt.split())
    if isinstance(prompt, list):
        return len(prompt)
    return 0


def messages_tokens(messages: list[Any]) -> int:
    count = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        count += 4 + text_tokens(content)
    return count + 2


def text_tokens(content: Any) -> int:
    """Words in a message's content: a string, or a list of text blocks (any API's)."""
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(text_tokens(block.get("text")) for block in content if isinstance(block, dict))
    return 0


def sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def typed_sse(event: str, data: Any) -> bytes:
    """An event with an `event:` line (the Responses and Anthropic Messages streams)."""
    return b"event: %b\ndata: %b\n\n" % (event.encode(), orjson.dumps(data))


SSE_DONE = b"data: [DONE]\n\n"


def error_body(message: str, kind: str, code: int, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def missing_field(name: str, body: dict[str, Any]) -> bytes:
    """vLLM's 400 for a request without a required field (FastAPI's validation, reworded)."""
    detail = {"type": "missing", "loc": f"body.{name}", "msg": "Field required"}
    detail["input"] = f"<dict of {len(body)} items>"
    return error_body(f"1 validation error:\n  {detail!r}", "Bad Request", 400, f"body.{name}")


def too_many_tokens(field: str, value: int, max_model_len: int) -> tuple[str, str]:
    """vLLM's message (and param) for an output limit above the context window."""
    message = (
        f"{field}={value} cannot be greater than max_model_len={max_model_len}. "
        f"Please request fewer output tokens. (parameter={field}, value={value})"
    )
    return message, field


def stream_error_event(message: str = "fake engine error") -> bytes:
    """vLLM's mid-stream error on chat/completions: serialized by `json.dumps`, spaces and all."""
    error = {"message": message, "type": "InternalServerError", "param": None, "code": 500}
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"


def model_not_found(model: Any, valid: str) -> bytes:
    message = f"The model `{model}` does not exist. Valid aliases: {valid}."
    return error_body(message, "NotFoundError", 404, "model")


def usage(prompt: int, completion: int, details: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    if details:
        out.update(prompt_tokens_details=None, completion_tokens_details=None)
    return out


def stream_events(
    body: dict[str, Any], chat: bool, tokens: int, rid: str, pad: str = ""
) -> Iterator[bytes]:
    """vLLM's SSE events for one request (without the final [DONE])."""
    created = int(time.time())
    model = body.get("model")
    n = body.get("n") or 1
    options = body.get("stream_options")
    with_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": rid, "object": kind, "created": created, "model": model}
    if chat:
        for index in range(n):
            delta = {"role": "assistant", "content": ""}
            role = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
            yield sse({**head, "choices": [role], "prompt_token_ids": None, "prompt_text": None})
    for i in range(tokens):
        last = i == tokens - 1
        for index in range(n):
            choice: dict[str, Any] = {"index": index}
            if chat:
                choice.update(delta={"content": token_text(i, pad)}, logprobs=None)
                choice["finish_reason"] = None
                if last:
                    choice.update(finish_reason="length", stop_reason=None)
                choice["token_ids"] = None
            else:
                choice.update(text=token_text(i, pad), logprobs=None)
                choice.update(finish_reason="length" if last else None, stop_reason=None)
                choice.update(prompt_token_ids=None, token_ids=None)
            # vLLM also puts `system_fingerprint` on the finish chunk when no usage chunk follows;
            # left out here: the proxy always asks upstream for usage, and the existing relay
            # tests compare its output with the fake's direct answer (see the surface notes).
            yield sse({**head, "choices": [choice]})
    if with_usage:
        u = usage(prompt_tokens(body), tokens * n, details=False)
        yield sse({**head, "choices": [], "usage": u, "system_fingerprint": FINGERPRINT})


def whole_answer(
    body: dict[str, Any], chat: bool, tokens: int, rid: str, pad: str = ""
) -> dict[str, Any]:
    n = body.get("n") or 1
    text = answer_text(tokens, pad)
    tail = {"token_ids": None}
    if chat:
        message = {"role": "assistant", "content": text, **_NULLS_CHAT_MESSAGE, "reasoning": None}
        choices: list[dict[str, Any]] = [
            {"index": i, "message": message, "logprobs": None, "finish_reason": "length"}
            for i in range(n)
        ]
        kind = "chat.completion"
    else:
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": "length"}
            for i in range(n)
        ]
        kind = "text_completion"
        tail.update(prompt_logprobs=None, prompt_token_ids=None)
    for choice in choices:
        choice.update(stop_reason=None, **tail, routed_experts=None)
    answer = {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": FINGERPRINT,
        "usage": usage(prompt_tokens(body), tokens * n),
    }
    if chat:
        answer.update(prompt_logprobs=None, prompt_token_ids=None, prompt_text=None)
    answer.update(kv_transfer_params=None, ec_transfer_params=None, metrics=None)
    return answer
