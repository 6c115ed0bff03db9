"""One contract, every registered policy: what the pipeline may rely on whatever the policy.

A new policy must add a case here (the registry and the cases are compared), and then passes the
same checks: an allowed request reaches the next handler exactly once and its answer comes back;
streams arrive byte for byte and closing them early closes the upstream's; errors from further in
pass through untouched; refusals are OpenAI-shaped 4xx errors; the global pipeline (model None,
used for unknown model names) builds and runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from starlette.datastructures import Headers

from policies import REGISTRY, build_policies
from proxy.api.chat import ChatCompletions
from proxy.core.api import Usage
from proxy.core.errors import UpstreamServerError, VgateError
from proxy.core.pipeline import ProxyRequest, ProxyResponse
from proxy.http.writer import error_body
from tests.fakes.vllm import FakeVLLM
from tests.policies.conftest import make_services

KEY = "vg-contract-key"
DIGEST = hashlib.sha256(KEY.encode()).hexdigest()


@dataclass(frozen=True)
class Case:
    settings: dict[str, Any]
    headers: dict[str, str]
    # A request this policy refuses (built on top of a fresh allowed one).
    refuse: Callable[[ProxyRequest], None]
    # Whether the policy did its work on an allowed request (so no case passes by skipping it).
    worked: Callable[[ProxyRequest], bool]
    # Makes the allowed request one the policy must work on (not only wave through).
    allowed: Callable[[ProxyRequest], None] = lambda request: None


def _no_key(request: ProxyRequest) -> None:
    request.headers = Headers(headers={})


def _huge(request: ProxyRequest) -> None:
    request.body["messages"] = [{"role": "user", "content": "word " * 5000}]


def _long(request: ProxyRequest) -> None:
    # Beyond the cheap bound (1 byte a token) of the 2048-token window, within the window
    # itself: truncate must count it with /tokenize, and let it through.
    request.body["messages"] = [{"role": "user", "content": "word " * 1200}]


CASES: dict[str, Case] = {
    "auth": Case(
        {"keys": [{"name": "contract", "sha256": DIGEST}]},
        {"authorization": f"Bearer {KEY}"},
        _no_key,
        worked=lambda r: r.key is not None and r.key.name == "contract",
    ),
    "ratelimit": Case(
        {"per_model": {"requests_per_minute": 60, "tokens_per_minute": 60_000}},
        {},
        lambda r: r.body.update(max_tokens=10**6),  # more than the whole token budget
        worked=lambda r: "x-ratelimit-remaining-tokens" in r.response_headers,
    ),
    "route": Case(
        {"rules": [{"model": "tiny", "to": "tiny-fp16"}]},
        {"x-vgate-precision": "full"},
        # A typo is an error, not a quiet "auto".
        lambda r: setattr(r, "headers", Headers(headers={"x-vgate-precision": "fulll"})),
        worked=lambda r: r.model == "tiny-fp16" and r.outcome.routed == "header",
    ),
    "truncate": Case(
        {"strategy": "reject"},
        {},
        _huge,
        worked=lambda r: (r.outcome.prompt_tokens or 0) > 1200,
        allowed=_long,
    ),
}


def test_every_registered_policy_has_a_contract_case() -> None:
    assert set(CASES) == set(REGISTRY)


def request_for(case: Case, stream: bool = False) -> ProxyRequest:
    body = {
        "model": "tiny",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        "stream": stream,
    }
    request = ProxyRequest(
        ChatCompletions(), "tiny", body, Headers(headers=case.headers), "rid", stream
    )
    case.allowed(request)
    return request


class Next:
    """The next handler: records calls, answers whole or streamed, or raises."""

    def __init__(self, stream: bool = False, error: VgateError | None = None) -> None:
        self.calls = 0
        self.stream = stream
        self.error = error
        self.closed = False
        self.response: ProxyResponse | None = None

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            for i in range(5):
                yield b'data: {"i": %d}\n\n' % i
        finally:
            self.closed = True

    async def __call__(self, request: ProxyRequest) -> ProxyResponse:
        self.calls += 1
        if self.error is not None:
            raise self.error
        request.usage = Usage(prompt_tokens=9, completion_tokens=8)
        if self.stream:
            self.response = ProxyResponse(200, "text/event-stream", stream=self._chunks())
        else:
            self.response = ProxyResponse(200, "application/json", b'{"ok": true}')
        return self.response


@pytest.fixture(params=sorted(CASES))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def build(
    fake: FakeVLLM,
) -> AsyncIterator[Callable[[str, str | None], list[Any]]]:
    async with httpx.AsyncClient() as client:

        def make(policy: str, model: str | None = "tiny") -> list[Any]:
            policies = {"order": [policy], policy: CASES[policy].settings}
            services = make_services(
                client, policies, fake.base_url, fake.max_model_len, ("tiny-fp16",)
            )
            return build_policies(services.config, model, services)

        yield make


async def test_allowed_request_reaches_next_once(name: str, build: Any) -> None:
    (policy,) = build(name)
    nxt = Next()
    request = request_for(CASES[name])
    response = await policy(request, nxt)
    assert nxt.calls == 1
    assert CASES[name].worked(request)
    assert response is nxt.response
    assert response.body == b'{"ok": true}'


async def test_streams_pass_byte_for_byte(name: str, build: Any) -> None:
    (policy,) = build(name)
    nxt = Next(stream=True)
    request = request_for(CASES[name], stream=True)
    response = await policy(request, nxt)
    assert CASES[name].worked(request)
    assert response.stream is not None
    chunks = [c async for c in response.stream]
    assert b"".join(chunks) == b"".join(b'data: {"i": %d}\n\n' % i for i in range(5))
    assert nxt.closed


async def test_closing_a_stream_early_closes_the_upstream(name: str, build: Any) -> None:
    (policy,) = build(name)
    nxt = Next(stream=True)
    response = await policy(request_for(CASES[name], stream=True), nxt)
    assert response.stream is not None
    stream = response.stream
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert nxt.closed


async def test_errors_from_further_in_pass_untouched(name: str, build: Any) -> None:
    (policy,) = build(name)
    error = UpstreamServerError("boom")
    with pytest.raises(UpstreamServerError) as raised:
        await policy(request_for(CASES[name]), Next(error=error))
    assert raised.value is error


async def test_refusals_are_openai_shaped_4xx(name: str, build: Any) -> None:
    (policy,) = build(name)
    request = request_for(CASES[name])
    CASES[name].refuse(request)
    nxt = Next()
    with pytest.raises(VgateError) as raised:
        await policy(request, nxt)
    assert nxt.calls == 0
    assert 400 <= raised.value.status < 500
    body = orjson.loads(error_body(raised.value))
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert KEY not in body["error"]["message"]


async def test_the_global_pipeline_builds_and_runs(name: str, build: Any) -> None:
    policies = build(name, None)
    assert len(policies) == 1
    request = request_for(CASES[name])
    request.model = "no-such-model"
    nxt = Next()
    await policies[0](request, nxt)
    assert nxt.calls == 1
