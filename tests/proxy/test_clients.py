"""The clients people use, pointed at the proxy's base_url with the fake vLLM behind it."""

from __future__ import annotations

import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langchain_openai import ChatOpenAI

from tests.conftest import ProxyFactory
from tests.fakes.vllm import FakeVLLM, answer_text

MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def base_url(proxy: ProxyFactory) -> str:
    return f"{proxy()}/v1"


def test_openai_sync(fake: FakeVLLM, base_url: str) -> None:
    with openai.OpenAI(base_url=base_url, api_key="sk-client", max_retries=0) as client:
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
        assert reply.choices[0].message.content == answer_text(4)
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 4

        text = client.completions.create(model="tiny", prompt="Once", max_tokens=3)
        assert text.choices[0].text == answer_text(3)

        models = client.models.list()
        assert [m.id for m in models.data] == ["tiny"]
    sent = fake.completions
    assert [s.path for s in sent] == ["/v1/chat/completions", "/v1/completions"]
    assert all("authorization" not in s.headers for s in sent)


def test_openai_sync_stream(base_url: str) -> None:
    with openai.OpenAI(base_url=base_url, api_key="k", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        completion = client.completions.create(
            model="tiny", prompt="Once", max_tokens=5, stream=True
        )
        pieces = [c.choices[0].text for c in completion]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == answer_text(6)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert "".join(pieces) == answer_text(5)


async def test_openai_async(base_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0) as client:
        reply = await client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=4, extra_body={"top_k": 3}
        )
        assert reply.choices[0].message.content == answer_text(4)
        stream = await client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=7, stream=True
        )
        content = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(content) == answer_text(7)
        # No include_usage asked: the client gets no usage chunk.
        async with await client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=2, stream=True
        ) as again:
            assert [c.usage async for c in again if c.usage is not None] == []


async def test_openai_async_errors_are_typed(base_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="gpt-4", messages=MESSAGES)
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="tiny", messages=[])
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model="tiny",
                messages=MESSAGES,
                extra_body={"fake": {"status": 400, "body": {"error": {"message": "too long"}}}},
            )
        assert "too long" in str(bad.value)


def chat_model(base_url: str, **kw: object) -> ChatOpenAI:
    return ChatOpenAI(
        model="tiny", base_url=base_url, api_key="k", max_retries=0, max_tokens=5, **kw
    )


def test_langchain_invoke_stream_batch(fake: FakeVLLM, base_url: str) -> None:
    llm = chat_model(base_url)
    reply = llm.invoke([HumanMessage("Say hello")])
    assert isinstance(reply, AIMessage)
    assert reply.content == answer_text(5)

    chunks = list(llm.stream("Say hello"))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert "".join(str(c.content) for c in chunks) == answer_text(5)

    replies = llm.batch(["one", "two", "three"])
    assert [r.content for r in replies] == [answer_text(5)] * 3
    assert len(fake.completions) == 5


async def test_langchain_async(base_url: str) -> None:
    llm = chat_model(base_url)
    reply = await llm.ainvoke("Say hello")
    assert reply.content == answer_text(5)
    content = "".join([str(c.content) async for c in llm.astream("Say hello")])
    assert content == answer_text(5)
    replies = await llm.abatch(["a", "b"])
    assert [r.content for r in replies] == [answer_text(5)] * 2
