"""Clients through the real proxy (`vgate serve`) to the real vLLM CPU engine.

The `openai` SDK and LangChain see exactly what they would in production: streaming and not,
usage chunks, n, stop, seeds, JSON mode, vLLM extras, vLLM's own errors, and disconnects that
reach the engine. The random tiny model rarely emits EOS, so every request sends max_tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI
from openai.types import Completion
from openai.types.chat import ChatCompletionMessageParam
from pydantic import SecretStr

from engine import procs
from engine.client import exposition
from tests.vllm_fixtures import VllmServer, free_port

pytestmark = pytest.mark.vllm

USER: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write a short poem about the sea."}
]


@pytest.fixture(scope="module")
def proxy_url(vllm_server: VllmServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vgate serve` in a process of its own, in front of the session's vLLM; yields .../v1."""
    work = tmp_path_factory.mktemp("proxy")
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
served_name = "{vllm_server.served_name}"

# A model the proxy knows but the engine does not: the engine's own 404 must come through.
[models.ghost]
upstreams = ["{vllm_server.base_url}"]
"""
    )
    log_path = work / "proxy.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            try:
                if httpx.get(base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield base + "/v1"
    finally:
        procs.stop_group(proc.pid, timeout=10)
        proc.wait(timeout=10)


@pytest.fixture
def client(proxy_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=proxy_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def metric(server: VllmServer, name: str) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    return sum(exposition.values(exposition.parse(text), name))


def test_models_list_shows_the_engine_window(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert models["tiny"].model_extra is not None
    assert models["tiny"].model_extra["max_model_len"] == 2048


def test_chat(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8)
    assert r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="def main():", max_tokens=6)
    assert r.choices[0].text and r.usage is not None and r.usage.completion_tokens == 6
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="def main():",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_n_two_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=5,
        n=2,
        seed=7,
        temperature=1.0,
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage is not None and r.usage.completion_tokens == 10


def test_stop_string_cuts_the_output(client: openai.OpenAI) -> None:
    def complete(stop: list[str] | None = None) -> Completion:
        return client.completions.create(
            model="tiny", prompt="import os", max_tokens=24, temperature=0.0, stop=stop
        )

    full = complete().choices[0].text
    middle = full.strip()[len(full.strip()) // 2 :][:3]
    assert middle.strip(), full
    cut = complete(stop=[middle]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(middle)]


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str | None:
        r = client.chat.completions.create(
            model="tiny",
            messages=USER,
            max_tokens=16,
            temperature=1.0,
            seed=seed,
        )
        return r.choices[0].message.content

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_json_object_response_format(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Answer in JSON."}],
        max_tokens=60,
        response_format={"type": "json_object"},
    )
    text = r.choices[0].message.content or ""
    assert text.lstrip().startswith(("{", "["))  # constrained decoding, even for noise weights


def test_json_schema_response_format_is_valid_json(client: openai.OpenAI) -> None:
    # A schema with one possible value leaves the random weights no choice but to finish: the
    # answer is complete JSON whatever the model would have said.
    schema = {
        "type": "object",
        "properties": {"a": {"enum": ["x"]}},
        "required": ["a"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Answer in JSON."}],
        max_tokens=200,
        seed=7,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert r.choices[0].finish_reason == "stop"
    assert json.loads(r.choices[0].message.content or "") == {"a": "x"}


def test_vllm_extra_ignore_eos(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="tiny", prompt="x", max_tokens=40, extra_body={"ignore_eos": True, "min_tokens": 40}
    )
    assert r.usage is not None and r.usage.completion_tokens == 40
    assert r.choices[0].finish_reason == "length"


def test_langchain_chat_openai(proxy_url: str) -> None:
    llm = ChatOpenAI(
        model="tiny",
        base_url=proxy_url,
        api_key=SecretStr("unused"),
        max_completion_tokens=8,
        max_retries=0,
    )
    message = llm.invoke("Hello there")
    assert isinstance(message.content, str) and message.content
    assert message.usage_metadata is not None and message.usage_metadata["output_tokens"] == 8
    pieces = list(llm.stream("Hello there"))
    assert "".join(str(p.content) for p in pieces)


def test_context_too_long_is_vllms_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="hello world " * 3000, max_tokens=4)
    assert "maximum context length is 2048 tokens" in info.value.message


def test_max_tokens_too_large_is_vllms_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=5000)
    assert "max_tokens=5000 cannot be greater than max_model_len=2048" in info.value.message


def test_model_unknown_to_the_engine_is_vllms_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="ghost", messages=USER, max_tokens=4)
    assert "The model `ghost` does not exist" in info.value.message


def test_client_disconnect_stops_generation_in_vllm(
    proxy_url: str, vllm_server: VllmServer
) -> None:
    before = metric(vllm_server, "vllm:generation_tokens_total")
    body = {
        "model": "tiny",
        "prompt": "count:",
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", proxy_url + "/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert metric(vllm_server, "vllm:num_requests_running") == 1
    # The client is gone: the proxy must abort upstream, and vLLM must stop generating.
    deadline = time.monotonic() + 10
    while metric(vllm_server, "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "vLLM still generating after the client left"
        time.sleep(0.1)
    generated = metric(vllm_server, "vllm:generation_tokens_total") - before
    assert generated < 1000, generated
