"""The Anthropic Messages routes of the fake, shaped as vLLM 0.32.0 answers them.

vLLM serves them by converting to a chat completion: ids are `chatcmpl-...`, bodies are dumped
without null fields (no `stop_sequence` unless one matched), streams are `event:` + `data:` lines
with no `ping` and no `[DONE]`. Request-validation errors stay OpenAI-shaped; everything the
handler rejects is Anthropic-shaped (`{"type":"error","error":{...}}`). Only `Authorization:
Bearer` authenticates (vLLM ignores `x-api-key` and `anthropic-version`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson

from tests.fakes.chat_tools import Call, call_tokens, calls_for
from tests.fakes.record import Seen
from tests.fakes.replies import Fault, Reply, Stream, Whole, json_reply
from tests.fakes.shapes import (
    messages_tokens,
    missing_field,
    token_text,
    too_many_tokens,
    typed_sse,
)

if TYPE_CHECKING:
    from tests.fakes.vllm import FakeVLLM


def anthropic_error(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def _openai_tool_choice(choice: Any) -> Any:
    """Anthropic's tool_choice in OpenAI's form (what vLLM converts it to)."""
    if not isinstance(choice, dict):
        return None
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return {"any": "required", "none": "none"}.get(str(kind), "auto")


def input_tokens(body: dict[str, Any]) -> int:
    turns = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    if body.get("system"):
        turns.insert(0, {"role": "system", "content": body["system"]})
    return messages_tokens(turns)


def _check(fake: FakeVLLM, body: dict[str, Any], required: tuple[str, ...]) -> Whole | None:
    for name in required:
        if name not in body:
            return Whole(400, missing_field(name, body))
    if body.get("model") != fake.model:
        message = f"The model `{body.get('model')}` does not exist. Valid aliases: {fake.model}."
        return Whole(404, anthropic_error("NotFoundError", message))
    return None


def count_tokens(fake: FakeVLLM, seen: Seen, body: dict[str, Any], fault: Fault) -> Reply:
    """POST /v1/messages/count_tokens."""
    rejected = _check(fake, body, ("model", "messages"))
    if rejected is not None:
        return rejected
    count = input_tokens(body)
    managed = {"original_input_tokens": count}
    return json_reply({"input_tokens": count, "context_management": managed})


def create(fake: FakeVLLM, seen: Seen, body: dict[str, Any], fault: Fault) -> Reply:
    """POST /v1/messages."""
    rejected = _check(fake, body, ("model", "messages", "max_tokens"))
    if rejected is not None:
        return rejected
    limit = int(body["max_tokens"])
    if limit > fake.max_model_len:
        message, _ = too_many_tokens("max_completion_tokens", limit, fake.max_model_len)
        return Whole(400, anthropic_error("BadRequestError", message))
    tools = {**body, "tool_choice": _openai_tool_choice(body.get("tool_choice"))}
    calls = calls_for(tools, fault) if fake.tool_parser else []
    tokens = int(fault.get("tokens", limit))
    pad = "." * int(fault.get("token_padding") or 0)
    rid = "chatcmpl-" + (seen.headers.get("x-request-id") or uuid.uuid4().hex[:16])
    if calls:
        stop, outputs = "tool_use", call_tokens(calls)
    else:
        stop, outputs = ("max_tokens" if tokens >= limit else "end_turn"), tokens
    usage = {"input_tokens": input_tokens(body), "output_tokens": outputs}
    if body.get("stream"):
        events = _events(body, rid, calls, tokens, pad, stop, usage)
        error = {"type": "internal_error", "message": "fake engine error"}
        return Stream(events, error=(typed_sse("error", {"type": "error", "error": error}),))
    content: list[dict[str, Any]] = [
        {"type": "tool_use", "id": c.id, "name": c.name, "input": orjson.loads(c.arguments)}
        for c in calls
    ] or [{"type": "text", "text": "".join(token_text(i, pad) for i in range(tokens))}]
    answer: dict[str, Any] = {"id": rid, "type": "message", "role": "assistant"}
    answer.update(content=content, model=body.get("model"), stop_reason=stop, usage=usage)
    return json_reply(answer)


def _events(
    body: dict[str, Any],
    rid: str,
    calls: list[Call],
    tokens: int,
    pad: str,
    stop: str,
    usage: dict[str, int],
) -> Iterator[bytes]:
    started: dict[str, Any] = {"id": rid, "type": "message", "role": "assistant", "content": []}
    started.update(model=body.get("model"), stop_reason=None, stop_sequence=None)
    started["usage"] = {"input_tokens": usage["input_tokens"], "output_tokens": 0}
    yield typed_sse("message_start", {"type": "message_start", "message": started})

    def block(
        index: int, start: dict[str, Any], deltas: Iterator[dict[str, Any]]
    ) -> Iterator[bytes]:
        opening = {"type": "content_block_start", "content_block": start, "index": index}
        yield typed_sse("content_block_start", opening)
        for delta in deltas:
            data = {"type": "content_block_delta", "delta": delta, "index": index}
            yield typed_sse("content_block_delta", data)
        yield typed_sse("content_block_stop", {"type": "content_block_stop", "index": index})

    for index, call in enumerate(calls):
        start = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
        pieces = ({"type": "input_json_delta", "partial_json": p} for p in call.pieces())
        yield from block(index, start, pieces)
    if not calls:
        texts = ({"type": "text_delta", "text": token_text(i, pad)} for i in range(tokens))
        yield from block(0, {"type": "text", "text": ""}, texts)
    delta = {"stop_reason": stop, "stop_sequence": None}
    yield typed_sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
    yield typed_sse("message_stop", {"type": "message_stop"})
