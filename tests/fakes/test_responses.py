"""The fake's Responses API, over real sockets, with raw HTTP and with the real `openai` SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from tests.fakes.sse_read import typed_events
from tests.fakes.vllm import FakeVLLM, answer_text

PATH = "/v1/responses"
# vLLM 0.32.0's response object, keys in its order (captured from the real engine).
RESPONSE_KEYS = [
    "id", "created_at", "incomplete_details", "instructions", "metadata", "model", "object",
    "output", "parallel_tool_calls", "temperature", "tool_choice", "tools", "top_p",
    "background", "max_output_tokens", "max_tool_calls", "previous_response_id", "prompt",
    "reasoning", "service_tier", "status", "text", "top_logprobs", "truncation", "usage", "user",
    "presence_penalty", "frequency_penalty", "kv_transfer_params", "ec_transfer_params",
    "input_messages", "output_messages",
]  # fmt: skip
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 3,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture
def client(fake: FakeVLLM) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.base_url, timeout=10) as c:
        yield c


@pytest.fixture
def sdk(fake: FakeVLLM) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{fake.base_url}/v1", api_key="k", max_retries=0) as c:
        yield c


def ask(tokens: int = 3, **extra: object) -> dict[str, object]:
    return {"model": "tiny", "input": "Hello there", "max_output_tokens": tokens, **extra}


def not_found(rid: str) -> dict[str, object]:
    message = f"Response with id '{rid}' not found."
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": "response_id",
            "code": 404,
        }
    }


def test_whole_response_like_vllm(client: httpx.Client) -> None:
    r = client.post(PATH, json=ask(3, instructions="be brief"))
    assert r.status_code == 200
    body = r.json()
    assert list(body) == RESPONSE_KEYS
    assert body["id"].startswith("resp_")
    assert (body["status"], body["incomplete_details"]) == (
        "incomplete",
        {"reason": "max_output_tokens"},
    )
    (item,) = body["output"]
    assert item["id"].startswith("msg_")
    assert item["content"] == [
        {"annotations": [], "text": answer_text(3), "type": "output_text", "logprobs": None}
    ]
    assert (body["tool_choice"], body["tools"], body["instructions"]) == ("none", [], "be brief")
    usage = body["usage"]
    assert usage["output_tokens"] == 3
    assert usage["total_tokens"] == usage["input_tokens"] + 3
    # Ended by EOS rather than by the limit: completed.
    done = client.post(PATH, json=ask(5, fake={"tokens": 2})).json()
    assert (done["status"], done["incomplete_details"]) == ("completed", None)


def test_stream_typed_events_and_terminal_event(client: httpx.Client) -> None:
    r = client.post(PATH, json=ask(3, stream=True))
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert b"[DONE]" not in r.content
    got = typed_events(r.content)
    assert [name for name, _ in got] == TEXT_EVENTS
    assert [data["type"] for _, data in got] == TEXT_EVENTS
    assert [data["sequence_number"] for _, data in got] == list(range(len(TEXT_EVENTS)))
    deltas = [data["delta"] for name, data in got if name == "response.output_text.delta"]
    assert "".join(deltas) == answer_text(3)
    created, completed = got[0][1]["response"], got[-1][1]["response"]
    assert (created["status"], created["usage"], created["output"]) == ("in_progress", None, [])
    assert completed["status"] == "incomplete"  # and still `response.completed`
    assert list(completed) == RESPONSE_KEYS
    # Stored once complete, under the streamed id.
    assert client.get(f"{PATH}/{completed['id']}").json() == completed


def test_store_retrieve_cancel_and_chains(client: httpx.Client) -> None:
    first = client.post(PATH, json=ask(2)).json()
    got = client.get(f"{PATH}/{first['id']}")
    assert (got.status_code, got.json()) == (200, first)
    cancel = client.post(f"{PATH}/{first['id']}/cancel")
    assert cancel.status_code == 400
    assert cancel.json()["error"]["message"] == "Cannot cancel a synchronous response."
    for r in (client.get(f"{PATH}/resp_nope"), client.post(f"{PATH}/resp_nope/cancel")):
        assert (r.status_code, r.json()) == (404, not_found("resp_nope"))
    follow = client.post(PATH, json=ask(2, input="And then?", previous_response_id=first["id"]))
    chained = follow.json()
    assert chained["previous_response_id"] == first["id"]
    prior = first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    alone = client.post(PATH, json=ask(2, input="And then?")).json()
    assert chained["usage"]["input_tokens"] == prior + alone["usage"]["input_tokens"]
    for stream in (False, True):
        missing = client.post(PATH, json=ask(2, previous_response_id="resp_gone", stream=stream))
        assert (missing.status_code, missing.json()) == (404, not_found("resp_gone"))
    unstored = client.post(PATH, json=ask(2, store=False)).json()
    assert client.get(f"{PATH}/{unstored['id']}").status_code == 404


def test_background_then_cancel(fake: FakeVLLM, client: httpx.Client) -> None:
    slow = client.post(PATH, json=ask(50, background=True, fake={"token_delay": 0.2})).json()
    assert (slow["status"], slow["output"], slow["usage"], slow["background"]) == (
        "queued",
        [],
        None,
        True,
    )
    assert client.get(f"{PATH}/{slow['id']}").json()["status"] == "queued"
    cancelled = client.post(f"{PATH}/{slow['id']}/cancel")
    assert (cancelled.status_code, cancelled.json()["status"]) == (200, "cancelled")
    assert client.get(f"{PATH}/{slow['id']}").json()["status"] == "cancelled"
    again = client.post(f"{PATH}/{slow['id']}/cancel")
    assert again.status_code == 400
    quick = client.post(PATH, json=ask(2, background=True)).json()
    deadline = time.monotonic() + 5
    while client.get(f"{PATH}/{quick['id']}").json()["status"] == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    final = client.get(f"{PATH}/{quick['id']}").json()
    assert final["output"][0]["content"][0]["text"] == answer_text(2)


def test_background_stream_replay(client: httpx.Client) -> None:
    r = client.post(PATH, json=ask(3, background=True, stream=True))
    rid = typed_events(r.content)[0][1]["response"]["id"]
    replay = client.get(f"{PATH}/{rid}", params={"stream": "true", "starting_after": 2})
    numbers = [data["sequence_number"] for _, data in typed_events(replay.content)]
    assert numbers == list(range(3, len(TEXT_EVENTS)))
    # Not a background stream: vLLM's replay raises after the headers.
    plain = client.post(PATH, json=ask(2)).json()
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(f"{PATH}/{plain['id']}", params={"stream": "true"})


def test_store_off_as_vllm_by_default() -> None:
    with FakeVLLM(responses_store=False) as fake, httpx.Client(base_url=fake.base_url) as c:
        made = c.post(PATH, json=ask(2)).json()
        assert c.get(f"{PATH}/{made['id']}").json() == not_found(made["id"])
        refused = c.post(PATH, json=ask(2, background=True))
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "background"
        assert "VLLM_ENABLE_RESPONSES_API_STORE=1" in refused.json()["error"]["message"]


def test_bad_requests_like_vllm(client: httpx.Client) -> None:
    missing = client.post(PATH, json={"model": "tiny"})
    assert (missing.status_code, missing.json()["error"]["param"]) == (400, "body.input")
    assert missing.json()["error"]["message"] == (
        "1 validation error:\n  {'type': 'missing', 'loc': 'body.input', 'msg': 'Field required',"
        " 'input': '<dict of 2 items>'}"
    )
    model = client.post(PATH, json={**ask(), "model": "gpt-4"})
    assert model.status_code == 404
    assert orjson.loads(model.content) == {
        "error": {
            "message": "The model `gpt-4` does not exist. Valid aliases: tiny.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    big = client.post(PATH, json=ask(5000)).json()["error"]
    assert big["message"].startswith("max_output_tokens=5000 cannot be greater than max_model_len")
    assert (big["type"], big["param"]) == ("BadRequestError", "max_output_tokens")


def test_error_event_after_drops_the_connection(fake: FakeVLLM, client: httpx.Client) -> None:
    # vLLM cannot serialize its own error event here: the client sees a truncated body.
    with client.stream("POST", PATH, json=ask(3, stream=True, fake={"error_event_after": 4})) as r:
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):
            for piece in r.iter_bytes():
                received += piece
    assert [name for name, _ in typed_events(received)] == TEXT_EVENTS[:4]
    assert fake.seen.inflight == 0


def test_openai_sdk_responses(sdk: openai.OpenAI) -> None:
    made = sdk.responses.create(model="tiny", input="Hello there", max_output_tokens=4)
    assert made.output_text == answer_text(4)
    assert made.status == "incomplete"
    assert made.usage is not None and made.usage.output_tokens == 4
    assert sdk.responses.retrieve(made.id).output_text == answer_text(4)
    chained = sdk.responses.create(
        model="tiny", input="More", max_output_tokens=2, previous_response_id=made.id
    )
    assert chained.previous_response_id == made.id
    with pytest.raises(openai.NotFoundError, match="Response with id 'resp_x' not found"):
        sdk.responses.retrieve("resp_x")
    with pytest.raises(openai.NotFoundError, match="Valid aliases: tiny"):
        sdk.responses.create(model="gpt-4", input="x", max_output_tokens=2)


def test_openai_sdk_streams_and_cancels(sdk: openai.OpenAI) -> None:
    events = list(sdk.responses.create(model="tiny", input="Hi", max_output_tokens=3, stream=True))
    assert [e.type for e in events] == TEXT_EVENTS
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == answer_text(3)
    with sdk.responses.stream(model="tiny", input="Hi", max_output_tokens=5) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text == answer_text(5)
    queued = sdk.responses.create(
        model="tiny",
        input="Hi",
        max_output_tokens=40,
        background=True,
        extra_body={"fake": {"token_delay": 0.2}},
    )
    assert queued.status == "queued"
    assert sdk.responses.cancel(queued.id).status == "cancelled"
