"""The response cache over real sockets: kept answers are served, marked, only when every upstream
of the chain has failed or sits behind an open breaker, and never to a key that may not use the
model."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from policies.auth import new_key
from tests.fakes.vllm import FakeVLLM
from tests.observability.helpers import scrape, value
from tests.proxy.helpers import CHAT_PATH, chat
from tests.resilience.conftest import FakeFactory, Gateway, GatewayFactory, closed_port_url, config

DOWN = {"status": 500, "body": "engine failed"}


def det(prompt: str = "Say hello", **extra: Any) -> dict[str, Any]:
    """A request its parameters fix: greedy."""
    body = chat(temperature=0, **extra)
    body["messages"] = [{"role": "user", "content": prompt}]
    return body


def setup(
    fake: FakeVLLM | str, *, cache: dict[str, Any] | None = None, **sections: Any
) -> dict[str, Any]:
    url = fake.base_url if isinstance(fake, FakeVLLM) else fake
    models = sections.pop("models", {"tiny": {"upstreams": [url]}})
    resilience = {"retry": {"attempts": 1}, **sections.pop("resilience", {})}
    return config(
        models,
        resilience,
        cache={"enabled": True, **(cache or {})},
        admin={"enabled": True, "port": 0},
        **sections,
    )


def post(gw: Gateway, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(gw.base_url + CHAT_PATH, json=body, headers=headers, timeout=10)


def metric(gw: Gateway, name: str, **labels: str) -> float | None:
    return value(scrape(gw.server), name, **labels)


def test_a_kept_answer_is_served_only_once_the_upstream_fails(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = gateway(setup(fake))
    first = post(gw, det())
    assert first.status_code == 200 and "x-vgate-cache" not in first.headers
    again = post(gw, det())  # healthy: the engine answers, the cache only keeps
    assert "x-vgate-cache" not in again.headers
    assert len(fake.completions) == 2
    fake.defaults = DOWN
    cached = post(gw, det())
    assert cached.status_code == 200
    assert cached.headers["x-vgate-cache"] == "fallback"
    assert cached.headers["x-vgate-cache-age"] == "0"
    assert "x-vgate-upstream" not in cached.headers
    assert cached.content == again.content
    assert len(fake.completions) == 3  # the engine was tried first
    other = post(gw, det("Something else"))
    assert other.status_code == 502
    assert other.json()["error"]["code"] == "upstream_server_error"
    assert metric(gw, "vgate_cache_stores_total", model="tiny") == 2
    assert metric(gw, "vgate_cache_hits_total", model="tiny") == 1
    assert metric(gw, "vgate_cache_misses_total", model="tiny") == 1
    assert metric(gw, "vgate_cache_entries") == 1


def test_a_stream_is_replayed_as_it_was_sent_and_only_to_a_stream(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = gateway(setup(fake))
    streamed = post(gw, det(stream=True))
    whole = post(gw, det("Other words"))
    assert streamed.content.endswith(b"data: [DONE]\n\n")
    fake.defaults = DOWN
    replay = post(gw, det(stream=True))
    assert replay.headers["x-vgate-cache"] == "fallback"
    assert replay.headers["content-type"].startswith("text/event-stream")
    assert replay.content == streamed.content  # byte for byte, the usage event still left out
    assert b'"usage"' not in replay.content
    # A whole answer is not turned into a stream, nor a stream into a whole answer.
    assert post(gw, det("Other words", stream=True)).status_code == 502
    assert post(gw, det(stream=False)).status_code == 502
    assert post(gw, det("Other words")).content == whole.content


def test_a_broken_stream_is_not_kept(fakes: FakeFactory, gateway: GatewayFactory) -> None:
    fake = fakes()
    gw = gateway(setup(fake))
    fake.defaults = {"end_after_events": 2}  # no [DONE]: the client sees an error event
    broken = post(gw, det(stream=True))
    assert b'"error"' in broken.content
    fake.defaults = DOWN
    assert post(gw, det(stream=True)).status_code == 502


def test_every_upstream_of_the_chain_must_have_failed(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    big, small = fakes(model="big"), fakes(model="small")
    models = {
        "big": {"upstreams": [big.base_url], "fallbacks": ["small"]},
        "small": {"upstreams": [small.base_url]},
    }
    resilience = {"breaker": {"fail_max": 1}, "retry": {"attempts": 2}}
    gw = gateway(setup(big, models=models, resilience=resilience))
    body = det(model="big")
    post(gw, body)
    big.defaults = DOWN
    moved = post(gw, body)  # the fallback model answers: no cached answer
    assert moved.headers["x-vgate-upstream"] == f"{small.base_url} small"
    assert "x-vgate-cache" not in moved.headers
    small.defaults = DOWN
    post(gw, det("Trips small's breaker", model="small"))
    assert gw.upstream("big").breaker.current_state == "open"
    assert gw.upstream("small").breaker.current_state == "open"
    seen = len(big.completions) + len(small.completions)
    cached = post(gw, body)  # every breaker open: nothing is tried
    assert cached.headers["x-vgate-cache"] == "fallback"
    assert cached.content == moved.content
    assert len(big.completions) + len(small.completions) == seen


def test_an_upstream_that_times_out_is_answered_from_the_cache(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = gateway(setup(fake, resilience={"retry": {"attempts": 1, "attempt_timeout": 0.2}}))
    kept = post(gw, det())
    fake.defaults = {"never_answer": True}
    cached = post(gw, det())
    assert cached.headers["x-vgate-cache"] == "fallback"
    assert cached.content == kept.content
    assert post(gw, det("New")).status_code == 504


def test_an_unreachable_upstream_is_answered_from_the_cache(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = gateway(setup(fake))
    kept = post(gw, det())
    fake.stop()
    cached = post(gw, det())
    assert cached.headers["x-vgate-cache"] == "fallback"
    assert cached.content == kept.content


def test_a_sampled_request_is_not_kept_unless_it_opts_in(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = gateway(setup(fake, resilience={"breaker": {"fail_max": 100}}))
    sampled = chat()  # no temperature: the model's defaults sample
    allowed = chat(tokens=5)
    seeded = chat(tokens=6, temperature=0.8, seed=7)
    post(gw, sampled)
    post(gw, allowed, **{"x-vgate-cache": "allow"})
    post(gw, seeded)
    post(gw, det(), **{"x-vgate-cache": "off"})
    assert metric(gw, "vgate_cache_stores_total", model="tiny") == 2
    fake.defaults = DOWN
    assert post(gw, sampled).status_code == 502
    assert post(gw, sampled, **{"x-vgate-cache": "allow"}).status_code == 502
    assert post(gw, allowed).status_code == 502  # a sampled request did not ask for it
    assert post(gw, allowed, **{"x-vgate-cache": "allow"}).headers["x-vgate-cache"] == "fallback"
    assert post(gw, seeded).headers["x-vgate-cache"] == "fallback"
    assert post(gw, det()).status_code == 502


def test_deterministic_only_false_keeps_every_answer(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = gateway(setup(fake, cache={"deterministic_only": False}))
    post(gw, chat())
    fake.defaults = DOWN
    assert post(gw, chat()).headers["x-vgate-cache"] == "fallback"
    assert post(gw, chat(), **{"x-vgate-cache": "off"}).status_code == 502


def test_a_bad_cache_header_is_refused_before_anything_is_charged(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    limits = {"ratelimit": {"overall": {"requests_per_minute": 10}}, "order": ["ratelimit"]}
    gw = gateway(setup(fake, policies=limits))
    r = post(gw, det(), **{"x-vgate-cache": "please"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "x-vgate-cache" in error["message"]
    assert fake.completions == []
    assert post(gw, det()).headers["x-ratelimit-remaining-requests"] == "9"


@pytest.mark.parametrize("shared", [True, False])
def test_a_key_gets_a_kept_answer_only_for_a_model_it_may_use(
    shared: bool, fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    other = fakes(model="other")
    (alice, alice_sha), (bob, bob_sha), (carol, carol_sha) = new_key(), new_key(), new_key()
    auth = {
        "order": ["auth"],
        "auth": {
            "keys": [
                {"name": "alice", "sha256": alice_sha, "models": ["tiny"]},
                {"name": "bob", "sha256": bob_sha, "models": ["other"]},
                {"name": "carol", "sha256": carol_sha},  # every model
            ]
        },
    }
    models = {"tiny": {"upstreams": [fake.base_url]}, "other": {"upstreams": [other.base_url]}}
    data = setup(fake, models=models, policies=auth, cache={"shared_across_keys": shared})
    gw = gateway(data)
    kept = post(gw, det(), authorization=f"Bearer {alice}")
    assert kept.status_code == 200
    fake.defaults = DOWN
    refused = post(gw, det(), authorization=f"Bearer {bob}")
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "model_not_found"
    assert b"choices" not in refused.content and "x-vgate-cache" not in refused.headers
    assert len(fake.completions) == 1  # bob never got past auth
    mine = post(gw, det(), authorization=f"Bearer {alice}")
    assert mine.headers["x-vgate-cache"] == "fallback" and mine.content == kept.content
    theirs = post(gw, det(), authorization=f"Bearer {carol}")
    if shared:
        assert theirs.headers["x-vgate-cache"] == "fallback"
    else:
        assert theirs.status_code == 502  # another tenant's answer is not served
        assert "x-vgate-cache" not in theirs.headers


def test_the_cache_is_bounded_by_entries_and_entry_size(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = gateway(setup(fake, cache={"max_entries": 2, "max_entry_bytes": 2000}))
    answers = [post(gw, det(f"Prompt {i}")) for i in range(3)]
    post(gw, det("Long", tokens=400))  # an answer over max_entry_bytes is not kept
    assert len(answers[0].content) < 2000
    samples = scrape(gw.server)
    assert value(samples, "vgate_cache_stores_total", model="tiny") == 3
    assert value(samples, "vgate_cache_evictions_total", reason="entries") == 1
    assert value(samples, "vgate_cache_entries") == 2
    fake.defaults = DOWN
    assert post(gw, det("Prompt 0")).status_code == 502  # the least recently used went
    assert post(gw, det("Prompt 2")).content == answers[2].content
    assert post(gw, det("Long", tokens=400)).status_code == 502


def test_no_cache_without_the_table(fakes: FakeFactory, gateway: GatewayFactory) -> None:
    fake = fakes()
    gw = gateway(config({"tiny": {"upstreams": [fake.base_url]}}, {"retry": {"attempts": 1}}))
    assert gw.runtime.cache is None
    post(gw, det())
    fake.defaults = DOWN
    assert post(gw, det()).status_code == 502


@pytest.mark.redis
def test_proxies_on_one_redis_share_kept_answers(
    redis_url: str, fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    shared = {"storage": redis_url, "key_prefix": f"test:{id(fake)}"}
    one = gateway(setup(fake, cache=shared))
    kept = post(one, det())
    assert kept.status_code == 200
    assert metric(one, "vgate_cache_entries") == 1
    # Another proxy, whose only engine refuses connections, answers with what the first kept.
    two = gateway(setup(closed_port_url(), cache=shared))
    cached = post(two, det())
    assert cached.headers["x-vgate-cache"] == "fallback"
    assert cached.content == kept.content
    assert metric(two, "vgate_cache_hits_total", model="tiny") == 1


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": "Once", "max_tokens": 4, "temperature": 0}),
        (
            "/v1/messages",
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "top_k": 1},
        ),
        ("/v1/embeddings", {"input": ["a cat", "a dog"]}),  # nothing sampled: always kept
    ],
)
def test_the_other_families_are_kept_and_served_too(
    path: str, body: dict[str, Any], fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    gw = gateway(setup(fake))
    body = {"model": "tiny", **body}
    kept = httpx.post(gw.base_url + path, json=body, timeout=10)
    assert kept.status_code == 200
    fake.defaults = DOWN
    cached = httpx.post(gw.base_url + path, json=body, timeout=10)
    assert cached.headers["x-vgate-cache"] == "fallback"
    assert cached.content == kept.content
