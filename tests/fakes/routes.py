"""Which request goes to which answer: the route table of the fake vLLM.

A route names its method, its handler, whether it is an inference request (counted in
`inflight`, what `/metrics` reports as running), and whether the `"fake"` faults apply to it.
Which routes exist depends on the engine's runner, as in vLLM: a generate model serves chat,
completions, Responses and Messages; a pooling model serves embeddings, score and rerank; the
fake's default serves both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from tests.fakes import messages_api, pooling, responses_api
from tests.fakes.chat_tools import calls_for, tool_stream_events, whole_tool_answer
from tests.fakes.record import Seen
from tests.fakes.replies import Fault, Reply, Stream, Whole, json_reply
from tests.fakes.shapes import (
    SSE_DONE,
    error_body,
    model_not_found,
    prompt_tokens,
    stream_error_event,
    stream_events,
    whole_answer,
)

if TYPE_CHECKING:
    from tests.fakes.vllm import FakeVLLM

Handler = Callable[["FakeVLLM", Seen, Any, Fault], Reply]


@dataclass(frozen=True)
class Route:
    method: str
    handler: Handler
    inference: bool = False  # counted in inflight and in `FakeVLLM.completions`
    faults: bool = False  # the `"fake"` knobs and `FakeVLLM.defaults` apply
    json_body: bool = False  # needs a JSON object body (else vLLM's 400)


def _health(fake: FakeVLLM, seen: Seen, body: Any, fault: Fault) -> Reply:
    return Whole(200, b"")


def _models(fake: FakeVLLM, seen: Seen, body: Any, fault: Fault) -> Reply:
    return Whole(200, fake.models_body())


def _metrics(fake: FakeVLLM, seen: Seen, body: Any, fault: Fault) -> Reply:
    return Whole(200, fake.metrics_body(), "text/plain; version=0.0.4; charset=utf-8")


def _tokenize(fake: FakeVLLM, seen: Seen, body: dict[str, Any], fault: Fault) -> Reply:
    if fake.tokenize_status != 200:
        status = fake.tokenize_status
        return Whole(status, error_body("tokenizer unavailable", "Error", status))
    count = prompt_tokens(body)
    tokens = list(range(count))
    return json_reply({"count": count, "max_model_len": fake.max_model_len, "tokens": tokens})


def _tool_choice_error(fake: FakeVLLM, body: dict[str, Any]) -> Whole | None:
    """vLLM's 400 for a tool_choice that needs a tool parser the engine was started without."""
    choice = body.get("tool_choice")
    if fake.tool_parser is not None or not body.get("tools") or choice in (None, "none"):
        return None
    if choice == "auto":
        message = (
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
        )
    else:
        name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        desc = f'function "{name}"' if name else f'"{choice}"'
        message = f"tool_choice={desc} requires --tool-call-parser to be set"
    return Whole(400, error_body(message, "BadRequestError", 400))


def _complete(fake: FakeVLLM, seen: Seen, body: dict[str, Any], fault: Fault) -> Reply:
    """/v1/chat/completions and /v1/completions."""
    if body.get("model") != fake.model:
        return Whole(404, model_not_found(body.get("model"), fake.model))
    chat = seen.route == "/v1/chat/completions"
    rejected = _tool_choice_error(fake, body) if chat else None
    if rejected is not None:
        return rejected
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    tokens = int(fault.get("tokens", max_tokens or 8))
    pad = "." * int(fault.get("token_padding") or 0)
    rid = ("chatcmpl-" if chat else "cmpl-") + (seen.headers.get("x-request-id") or "fake")
    calls = calls_for(body, fault) if chat and fake.tool_parser else []
    stream = bool(body.get("stream"))
    if calls:
        if not stream:
            return json_reply(whole_tool_answer(body, calls, rid))
        events = tool_stream_events(body, calls, rid)
    elif not stream:
        return json_reply(whole_answer(body, chat, tokens, rid, pad))
    else:
        events = stream_events(body, chat, tokens, rid, pad)
    return Stream(events, tail=(SSE_DONE,), error=(stream_error_event(), SSE_DONE))


def _retrieve(fake: FakeVLLM, seen: Seen, body: Any, fault: Fault) -> Reply:
    return responses_api.retrieve(fake, seen, _response_id(seen))


def _cancel(fake: FakeVLLM, seen: Seen, body: Any, fault: Fault) -> Reply:
    return responses_api.cancel(fake, seen, _response_id(seen))


_RESPONSE_ID = re.compile(r"^/v1/responses/([^/]+)(/cancel)?$")


def _response_id(seen: Seen) -> str:
    match = _RESPONSE_ID.match(seen.route)
    assert match is not None
    return match.group(1)


def _api(handler: Handler, inference: bool = True) -> Route:
    """A POST route of the OpenAI/Anthropic surface: JSON body, faults apply."""
    return Route("POST", handler, inference=inference, faults=True, json_body=True)


_ALWAYS = {
    "/health": Route("GET", _health),
    "/v1/models": Route("GET", _models),
    "/metrics": Route("GET", _metrics),
    "/tokenize": Route("POST", _tokenize, json_body=True),
}
_GENERATE = {
    "/v1/chat/completions": _api(_complete),
    "/v1/completions": _api(_complete),
    "/v1/responses": _api(responses_api.create),
    "/v1/messages": _api(messages_api.create),
    # Renders the prompt only: no engine request, not running in /metrics.
    "/v1/messages/count_tokens": _api(messages_api.count_tokens, inference=False),
}
_POOLING = {
    "/v1/embeddings": _api(pooling.embeddings),
    "/v1/score": _api(pooling.score),
    "/score": _api(pooling.score),
    "/v1/rerank": _api(pooling.rerank),
    "/rerank": _api(pooling.rerank),
    "/v2/rerank": _api(pooling.rerank),
}
_RETRIEVE = Route("GET", _retrieve, faults=True)
_CANCEL = Route("POST", _cancel, faults=True)
INFERENCE = frozenset(p for p, r in {**_GENERATE, **_POOLING}.items() if r.inference)


_TABLES = {
    None: {**_ALWAYS, **_GENERATE, **_POOLING},
    "generate": {**_ALWAYS, **_GENERATE},
    "pooling": {**_ALWAYS, **_POOLING},
}


def resolve(path: str, fake: FakeVLLM) -> Route | None:
    """The route serving `path` (no query string) on this fake's engine, if any."""
    route = _TABLES[fake.runner].get(path)
    if route is None and fake.runner != "pooling":
        match = _RESPONSE_ID.match(path)
        if match is not None:
            cancel = match.group(2) is not None
            route = _CANCEL if cancel else _RETRIEVE
    return route


def not_found() -> Whole:
    return Whole(404, orjson.dumps({"detail": "Not Found"}))
