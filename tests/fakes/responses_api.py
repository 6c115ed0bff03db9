"""The Responses API routes of the fake: create (stream or not, background or not), retrieve,
cancel, and the store behind them, which behaves as vLLM's with VLLM_ENABLE_RESPONSES_API_STORE=1
(in memory, never evicted). `FakeVLLM(responses_store=False)` is vLLM's default instead: nothing
is kept, every id is unknown, and `background` is refused.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from typing import TYPE_CHECKING, Any

from tests.fakes.chat_tools import calls_for
from tests.fakes.record import Seen
from tests.fakes.replies import Fault, Reply, Stream, Whole, json_reply
from tests.fakes.responses_shapes import Answer
from tests.fakes.shapes import error_body, missing_field, model_not_found, too_many_tokens

if TYPE_CHECKING:
    from tests.fakes.vllm import FakeVLLM

_NO_STORE = (
    "This vLLM engine does not support `store=True` and therefore does not support the "
    "background mode. To enable these features, set the environment variable "
    "`VLLM_ENABLE_RESPONSES_API_STORE=1` when launching the vLLM server."
)
_LIVE = ("queued", "in_progress")


class ResponseStore:
    """Responses by id (thread-safe: tests read it from their own thread)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._bodies: dict[str, dict[str, Any]] = {}
        self._events: dict[str, list[bytes]] = {}  # background streams, for replay
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def get(self, rid: str) -> dict[str, Any] | None:
        with self._lock:
            body = self._bodies.get(rid)
            return copy.deepcopy(body) if body is not None else None

    def put(self, rid: str, body: dict[str, Any], unless_cancelled: bool = False) -> None:
        with self._lock:
            old = self._bodies.get(rid)
            if not (unless_cancelled and old is not None and old["status"] == "cancelled"):
                self._bodies[rid] = body

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._bodies)

    def events(self, rid: str) -> list[bytes] | None:
        with self._lock:
            return self._events.get(rid)

    def keep_events(self, rid: str, events: list[bytes]) -> None:
        with self._lock:
            self._events[rid] = events

    def track(self, rid: str, task: asyncio.Task[None] | None) -> None:
        """The task generating a background response (None: it finished)."""
        with self._lock:
            if task is None:
                self._tasks.pop(rid, None)
            else:
                self._tasks[rid] = task

    def clear(self) -> None:
        """Forget everything (from any thread): background generation stops."""
        for task in self.take_tasks():
            task.get_loop().call_soon_threadsafe(task.cancel)
        with self._lock:
            self._bodies.clear()
            self._events.clear()

    def take_tasks(self) -> list[asyncio.Task[None]]:
        """The background tasks still running, no longer tracked (the caller stops them)."""
        with self._lock:
            tasks, self._tasks = list(self._tasks.values()), {}
        return tasks

    def cancel(self, rid: str) -> dict[str, Any] | None:
        """Mark a live response cancelled; its body, or None if it is not live."""
        with self._lock:
            body = self._bodies[rid]
            if body["status"] not in _LIVE:
                return None
            body["status"] = "cancelled"
            task = self._tasks.pop(rid, None)
        if task is not None:
            task.cancel()
        return copy.deepcopy(body)


def not_found(rid: str) -> Whole:
    message = f"Response with id '{rid}' not found."
    return Whole(404, error_body(message, "invalid_request_error", 404, "response_id"))


def create(fake: FakeVLLM, seen: Seen, body: dict[str, Any], fault: Fault) -> Reply:
    """POST /v1/responses."""
    if "input" not in body:
        # vLLM's before-validators have set tool_choice by then (it counts in the message).
        seen_by_pydantic = body if body.get("tools") else {**body, "tool_choice": "none"}
        return Whole(400, missing_field("input", seen_by_pydantic))
    if body.get("model") != fake.model:
        return Whole(404, model_not_found(body.get("model"), fake.model))
    limit = body.get("max_output_tokens")
    if isinstance(limit, int) and limit > fake.max_model_len:
        message, param = too_many_tokens("max_output_tokens", limit, fake.max_model_len)
        return Whole(400, error_body(message, "BadRequestError", 400, param))
    store = fake.responses
    background = bool(body.get("background"))
    keep = store.enabled and body.get("store", True) is not False
    if background and not store.enabled and body.get("store", True) is not False:
        return Whole(400, error_body(_NO_STORE, "invalid_request_error", 400, "background"))
    prior = 0
    previous = body.get("previous_response_id")
    if previous is not None:
        before = store.get(str(previous))
        if before is None:
            return not_found(str(previous))
        usage = before.get("usage") or {}
        prior = usage.get("input_tokens", 0) + usage.get("output_tokens", 0)
    tokens = int(fault.get("tokens", limit or 8))
    pad = "." * int(fault.get("token_padding") or 0)
    calls = calls_for(body, fault) if fake.tool_parser else []
    answer = Answer(body, tokens, calls, pad, prior)
    if background:
        return _background(fake, answer, fault)
    if not body.get("stream"):
        final = answer.response()
        if keep:
            store.put(answer.id, final)
        return json_reply(final)
    done = (lambda: store.put(answer.id, answer.response())) if keep else None
    return Stream(answer.events(), error=None, done=done)


def _background(fake: FakeVLLM, answer: Answer, fault: Fault) -> Reply:
    store = fake.responses
    store.put(answer.id, answer.response("queued"))
    if answer.body.get("stream"):
        events = list(answer.events(answer.response))
        store.keep_events(answer.id, events)
        done = lambda: store.put(answer.id, answer.response(), unless_cancelled=True)  # noqa: E731
        return Stream(events, error=None, done=done)

    async def generate() -> None:
        # As long as a stream of the same request would take.
        await asyncio.sleep(answer.tokens * float(fault.get("token_delay", 0.0)))
        store.put(answer.id, answer.response(), unless_cancelled=True)
        store.track(answer.id, None)

    store.track(answer.id, asyncio.get_running_loop().create_task(generate()))
    return json_reply(answer.response("queued"))


def retrieve(fake: FakeVLLM, seen: Seen, rid: str) -> Reply:
    """GET /v1/responses/{id}[?stream=true&starting_after=N]."""
    body = fake.responses.get(rid)
    if body is None:
        return not_found(rid)
    if seen.query.get("stream", "").lower() not in ("true", "1", "yes", "on"):
        return json_reply(body)
    events = fake.responses.events(rid)
    if events is None:
        # vLLM's replay generator raises for a response that was not a background stream.
        return Stream((), error=None, cut_after=0)
    after = int(seen.query.get("starting_after") or -1)
    return Stream(events[after + 1 :], error=None)


def cancel(fake: FakeVLLM, seen: Seen, rid: str) -> Reply:
    """POST /v1/responses/{id}/cancel."""
    if fake.responses.get(rid) is None:
        return not_found(rid)
    body = fake.responses.cancel(rid)
    if body is None:
        message = "Cannot cancel a synchronous response."
        return Whole(400, error_body(message, "invalid_request_error", 400, "response_id"))
    return json_reply(body)
