"""The whole API surface through the real proxy (`vgate serve`, auth and truncation on) to real
vLLM CPU engines, with the clients people point at it: the openai SDK (models, Responses,
embeddings), LangChain (Responses API chat, embeddings), the anthropic SDK (Messages,
count_tokens), and a tool call round trip through chat.

The tiny random model talks nonsense and rarely stops by itself: every request bounds its
output, and assertions are about what the protocol guarantees, never about the words.
"""

from __future__ import annotations

import base64
import struct
import sys
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from pydantic import SecretStr

from policies.auth import new_key
from tests.fakes.processes import service
from tests.vllm_fixtures import EMBED_NAME, VllmServer, free_port

pytestmark = pytest.mark.vllm

APP, NARROW = new_key(), new_key()  # every model; only the embedding model
HELLO = "Hello there, how are you?"


@pytest.fixture(scope="module")
def proxy_base(
    vllm_server: VllmServer,
    vllm_embed_server: VllmServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """`vgate serve` in front of both engines; yields its base URL (no /v1)."""

    work = tmp_path_factory.mktemp("surface")
    port = free_port()
    config = work / "vgate.toml"
    config.write_text(
        f"""
[server]
port = {port}
drain_timeout = 1.0

[upstream]
health_interval = 1.0
metrics_interval = 1.0

[models.tiny]
upstreams = ["{vllm_server.base_url}"]

[models.{EMBED_NAME}]
upstreams = ["{vllm_embed_server.base_url}"]

[policies]
order = ["auth", "truncate"]

[policies.auth]
keys = [
  {{ name = "app", sha256 = "{APP[1]}" }},
  {{ name = "narrow", sha256 = "{NARROW[1]}", models = ["{EMBED_NAME}"] }},
]

[policies.truncate]
strategy = "drop_oldest"
"""
    )
    args = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)]
    with service(args, port, work / "proxy.log", within=60):
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while httpx.get(base + "/ready", timeout=2).status_code != 200:
            assert time.monotonic() < deadline, (work / "proxy.log").read_text()
            time.sleep(0.3)
        yield base


@pytest.fixture
def client(proxy_base: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=proxy_base + "/v1", api_key=APP[0], max_retries=0, timeout=120
    ) as c:
        yield c


@pytest.fixture
def claude(proxy_base: str) -> Iterator[anthropic.Anthropic]:
    # What Anthropic-SDK tools do: the key in x-api-key, anthropic-version on every request.
    with anthropic.Anthropic(base_url=proxy_base, api_key=APP[0], max_retries=0, timeout=120) as c:
        yield c


# Models -------------------------------------------------------------------------------------


def test_models_retrieve_shows_one_model_and_404s_others(proxy_base: str) -> None:
    with openai.OpenAI(base_url=proxy_base + "/v1", api_key=APP[0], max_retries=0) as c:
        tiny = c.models.retrieve("tiny")
        assert (tiny.id, tiny.object) == ("tiny", "model")
        assert c.models.retrieve(EMBED_NAME).id == EMBED_NAME
        with pytest.raises(openai.NotFoundError) as info:
            c.models.retrieve("gpt-4")
        assert info.value.code == "model_not_found"
    with openai.OpenAI(base_url=proxy_base + "/v1", api_key=NARROW[0], max_retries=0) as c:
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("tiny")  # this key may not use it: as if it did not exist
        assert [m.id for m in c.models.list()] == [EMBED_NAME]


# Responses ----------------------------------------------------------------------------------


def test_responses_create_and_retrieve(client: openai.OpenAI) -> None:
    made = client.responses.create(model="tiny", input=HELLO, max_output_tokens=8)
    assert made.id.startswith("resp_") and made.model == "tiny"
    assert made.status in ("completed", "incomplete")
    assert made.usage is not None and made.usage.input_tokens > 0
    assert made.usage.output_tokens == 8  # the random model does not stop by itself
    again = client.responses.retrieve(made.id)
    assert (again.id, again.output_text) == (made.id, made.output_text)
    with (
        openai.OpenAI(base_url=str(client.base_url), api_key=NARROW[0], max_retries=0) as other,
        pytest.raises(openai.NotFoundError),
    ):
        other.responses.retrieve(made.id)  # another key's response does not exist for it


def test_responses_stream_is_vllm_s_typed_events_and_names_one_response(
    client: openai.OpenAI,
) -> None:
    events = list(
        client.responses.create(model="tiny", input=HELLO, max_output_tokens=8, stream=True)
    )
    types = [e.type for e in events]
    assert types[0] == "response.created"
    assert types[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response  # type: ignore[union-attr]
    assert events[0].response.id == final.id  # type: ignore[union-attr]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert deltas == final.output_text
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model="tiny", input=HELLO, max_output_tokens=6)
    follow = client.responses.create(
        model="tiny", input="And then?", previous_response_id=first.id, max_output_tokens=6
    )
    assert follow.previous_response_id == first.id
    assert follow.usage is not None and first.usage is not None
    # The engine prepended the first exchange: more prompt than the follow-up's own words.
    alone = client.responses.create(model="tiny", input="And then?", max_output_tokens=6)
    assert alone.usage is not None
    assert follow.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens - 1
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny", input="x", previous_response_id=first.id[:-2] + "00")


def test_a_background_response_is_retrieved_from_its_engine(client: openai.OpenAI) -> None:
    made = client.responses.create(model="tiny", input=HELLO, max_output_tokens=16, background=True)
    assert made.status in ("queued", "in_progress", "completed", "incomplete")
    deadline = time.monotonic() + 60
    got = client.responses.retrieve(made.id)
    while got.status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
        got = client.responses.retrieve(made.id)
    assert got.id == made.id and got.status in ("completed", "incomplete")
    assert got.usage is not None and got.usage.output_tokens == 16


def test_a_conversation_too_long_for_the_window_is_fitted(client: openai.OpenAI) -> None:
    turn = "word " * 150
    items: list[Any] = []
    for _ in range(20):  # ~6,000 tokens against a 2,048-token window
        items += [
            {"role": "user", "content": turn},
            {"role": "assistant", "content": turn},
        ]
    items.append({"role": "user", "content": HELLO})
    raw = client.responses.with_raw_response.create(model="tiny", input=items, max_output_tokens=4)
    dropped = int(raw.headers["x-vgate-truncated"])
    assert 0 < dropped < len(items)
    answer = raw.parse()
    assert answer.usage is not None and answer.usage.input_tokens + 4 <= 2048


def test_langchain_chat_openai_on_the_responses_api(proxy_base: str) -> None:
    llm = ChatOpenAI(
        model="tiny",
        base_url=proxy_base + "/v1",
        api_key=SecretStr(APP[0]),
        use_responses_api=True,
        max_tokens=6,  # type: ignore[call-arg]
        max_retries=0,
    )
    message = llm.invoke(HELLO)
    assert message.usage_metadata is not None and message.usage_metadata["output_tokens"] == 6
    assert message.text  # the output text, whatever it says
    streamed = list(llm.stream(HELLO))
    assert "".join(chunk.text for chunk in streamed)


# Embeddings ---------------------------------------------------------------------------------


def test_embeddings_float_and_base64_agree(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(
        model=EMBED_NAME, input=["a cat", "a dog"], encoding_format="float"
    )
    assert [d.index for d in floats.data] == [0, 1]
    dims = {len(d.embedding) for d in floats.data}
    assert len(dims) == 1 and dims.pop() > 0
    assert floats.usage.prompt_tokens > 0
    assert floats.usage.total_tokens == floats.usage.prompt_tokens  # nothing generated
    # The SDK's default asks for base64 and decodes it: the same vectors.
    packed = client.embeddings.create(model=EMBED_NAME, input=["a cat", "a dog"])
    for a, b in zip(floats.data, packed.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    raw = httpx.post(
        str(client.base_url) + "embeddings",
        headers={"authorization": f"Bearer {APP[0]}"},
        json={"model": EMBED_NAME, "input": "a cat", "encoding_format": "base64"},
        timeout=60,
    ).json()
    data = base64.b64decode(raw["data"][0]["embedding"])
    first = struct.unpack(f"<{len(data) // 4}f", data)
    assert list(first) == pytest.approx(floats.data[0].embedding, abs=1e-6)
    # Token ids in, and a key limited to the embedding model may use it.
    with openai.OpenAI(base_url=str(client.base_url), api_key=NARROW[0], max_retries=0) as c:
        ids = c.embeddings.create(model=EMBED_NAME, input=[[1, 2, 3]], encoding_format="float")
        assert len(ids.data[0].embedding) == len(floats.data[0].embedding)
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
            )


def test_embeddings_bounds_are_the_proxy_s_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=EMBED_NAME, input=["x"] * 5000)
    assert info.value.param == "input" and "limit is 2048" in info.value.message


def test_score_where_the_engine_serves_it(proxy_base: str) -> None:
    r = httpx.post(
        proxy_base + "/v1/score",
        headers={"authorization": f"Bearer {APP[0]}"},
        json={"model": EMBED_NAME, "text_1": "a cat", "text_2": ["a dog", "a car"]},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert [d["index"] for d in r.json()["data"]] == [0, 1]


def test_langchain_openai_embeddings(proxy_base: str) -> None:
    embeddings = OpenAIEmbeddings(
        model=EMBED_NAME,
        base_url=proxy_base + "/v1",
        api_key=SecretStr(APP[0]),
        check_embedding_ctx_length=False,  # its tiktoken check needs files from the internet
        max_retries=0,
    )
    vectors = embeddings.embed_documents(["first document", "second document"])
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0
    assert len(embeddings.embed_query("a question")) == len(vectors[0])


# Anthropic Messages -------------------------------------------------------------------------


def test_anthropic_messages_create_stream_and_count(claude: anthropic.Anthropic) -> None:
    messages: Any = [{"role": "user", "content": HELLO}]
    made = claude.messages.create(
        model="tiny", max_tokens=8, messages=messages, system="Answer briefly."
    )
    assert made.type == "message" and made.role == "assistant"
    assert made.stop_reason == "max_tokens" and made.usage.output_tokens == 8
    assert made.content and made.content[0].type == "text"
    with claude.messages.stream(model="tiny", max_tokens=8, messages=messages) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.usage.output_tokens == 8
    assert text == "".join(b.text for b in final.content if b.type == "text")
    counted = claude.messages.count_tokens(
        model="tiny", messages=messages, system="Answer briefly."
    )
    assert counted.input_tokens == made.usage.input_tokens


def test_anthropic_errors_are_anthropic_shaped(proxy_base: str) -> None:
    one = [{"role": "user", "content": "x"}]
    bad = anthropic.Anthropic(base_url=proxy_base, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as auth:
        bad.messages.create(model="tiny", max_tokens=2, messages=one)  # type: ignore[arg-type]
    assert auth.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    narrow = anthropic.Anthropic(base_url=proxy_base, api_key=NARROW[0], max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        narrow.messages.create(model="tiny", max_tokens=2, messages=one)  # type: ignore[arg-type]
    app = anthropic.Anthropic(base_url=proxy_base, api_key=APP[0], max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as info:
        app.messages.create(
            model="tiny", max_tokens=2, messages=[{"role": "user", "content": "word " * 4000}]
        )
    assert "maximum context length" in info.value.message
    for c in (bad, narrow, app):
        c.close()


# Tool calls ---------------------------------------------------------------------------------

WEATHER: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]


def _calls(message: Any) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def test_a_tool_call_round_trip_through_chat(client: openai.OpenAI) -> None:
    question: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    # Greedy: the stream must carry exactly what the whole answer does. What the random model
    # says is not a promise (its arguments may not even be JSON); the protocol's shapes are.
    asked = client.chat.completions.create(
        model="tiny", messages=question, tools=WEATHER, tool_choice=named,
        max_tokens=48, temperature=0,
    )  # fmt: skip
    choice = asked.choices[0]
    for call in choice.message.tool_calls or []:
        assert call.id and call.type == "function" and call.function.name == "get_weather"
        assert isinstance(call.function.arguments, str)
    if not choice.message.tool_calls:
        assert choice.finish_reason == "length" and isinstance(choice.message.content, str)
    stream = client.chat.completions.create(
        model="tiny", messages=question, tools=WEATHER, tool_choice=named,
        max_tokens=48, temperature=0, stream=True,
    )  # fmt: skip
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            for part in c.delta.tool_calls or []:
                if part.function and part.function.name:
                    names[part.index] = part.function.name
                if part.function and part.function.arguments:
                    arguments[part.index] = arguments.get(part.index, "") + part.function.arguments
    streamed = [(names[i], arguments.get(i, "")) for i in sorted(names)]
    assert {name for name, _ in streamed} <= {"get_weather"}
    if choice.finish_reason != "length":
        # A whole call: the stream's deltas add up to it. (Cut by max_tokens, the stream's
        # parser shows a partial call where the whole answer keeps the raw text.)
        assert streamed == _calls(choice.message)
    # The round trip: the call (the model's, or one made up if it made none) and its result go
    # back, and the engine answers with them in the prompt.
    call_id = choice.message.tool_calls[0].id if choice.message.tool_calls else "call_1"
    args = choice.message.tool_calls[0].function.arguments if choice.message.tool_calls else ""
    turn: Any = [
        *question,
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": args or '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": '{"sky": "clear", "temp_c": 21}'},
    ]
    answered = client.chat.completions.create(
        model="tiny", messages=turn, tools=WEATHER, max_tokens=8
    )
    assert answered.choices[0].finish_reason in ("length", "stop", "tool_calls")
    assert answered.usage is not None and asked.usage is not None
    assert answered.usage.prompt_tokens > asked.usage.prompt_tokens  # the result was read
    # "auto" needs the engine's tool parser (on here): either answer is well formed.
    auto = client.chat.completions.create(
        model="tiny", messages=question, tools=WEATHER, tool_choice="auto", max_tokens=16
    )
    if auto.choices[0].message.tool_calls:
        assert auto.choices[0].finish_reason == "tool_calls"
        assert {name for name, _ in _calls(auto.choices[0].message)} == {"get_weather"}
    else:
        assert auto.choices[0].finish_reason in ("length", "stop")
