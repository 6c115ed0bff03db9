"""Tenants apart in the engine: each API key its own `cache_salt` (its own prefix cache), and its
priority as vLLM's `priority` on engines scheduling by it; what the fake engine received decides."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from policies.auth import new_key
from tests.fakes.harness import ProxyServer
from tests.fakes.vllm import FakeVLLM

ALICE = new_key()  # priority 5
BOB = new_key()  # priority 0
USER = [{"role": "user", "content": "Say hello"}]
SALT = re.compile(r"[A-Za-z0-9_-]{43}")  # 256 bits, base64url


def config(fake: FakeVLLM, **auth: Any) -> dict[str, Any]:
    tiny = {"served_name": "tiny"}
    return {
        "server": {"drain_timeout": 1.0},
        "upstream": {"health_interval": 30.0, "metrics_interval": 30.0},
        "engines": {
            # The fake stands in for an engine vgate would launch with priority scheduling.
            "prio": {
                "model": "unused",
                "port": fake.port,
                "served_name": "tiny",
                "scheduling_policy": "priority",
                "warmup": False,
            }
        },
        "models": {
            "tiny": {"upstreams": ["engine:prio"]},
            "fcfs": {"upstreams": [fake.base_url], **tiny},
            "remote": {
                "upstreams": [{"url": fake.base_url, "scheduling_policy": "priority"}],
                **tiny,
            },
        },
        "policies": {
            "order": ["auth"],
            "auth": {
                "keys": [
                    {"name": "alice", "sha256": ALICE[1], "priority": 5},
                    {"name": "bob", "sha256": BOB[1]},
                ],
                **auth,
            },
        },
    }


@pytest.fixture(scope="module")
def server(_shared_fake: FakeVLLM) -> Iterator[ProxyServer]:
    with ProxyServer.from_dict(config(_shared_fake)) as running:
        yield running


def post(base: str, path: str, body: dict[str, Any], key: str | None = ALICE[0]) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}{path}", json=body, headers=headers, timeout=10)


def chat(model: str = "tiny", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": USER, "max_tokens": 3, **fields}


def sent(fake: FakeVLLM, path: str | None = None) -> dict[str, Any]:
    """The body of the one inference request (or request to `path`) the fake got since the
    last call."""
    (seen,) = fake.completions if path is None else fake.requests_to(path)
    fake.reset()
    body: dict[str, Any] = seen.body
    return body


def salt_of(base: str, fake: FakeVLLM, key: str, **fields: Any) -> str:
    r = post(base, "/v1/chat/completions", chat("fcfs", **fields), key)
    assert r.status_code == 200, r.text
    salt: str = sent(fake)["cache_salt"]
    return salt


def test_each_key_gets_a_salt_of_its_own(server: ProxyServer, fake: FakeVLLM) -> None:
    base = server.base_url
    alice = [salt_of(base, fake, ALICE[0]) for _ in range(2)]
    bob = [salt_of(base, fake, BOB[0]) for _ in range(2)]
    assert alice[0] == alice[1] and bob[0] == bob[1]
    assert alice[0] != bob[0]
    for salt, (key, digest), name in ((alice[0], ALICE, "alice"), (bob[0], BOB, "bob")):
        assert SALT.fullmatch(salt)
        # Made from the key's name with the server's secret: neither the key nor the name.
        assert name not in salt and key not in salt and salt not in digest


ROUTES = [
    ("/v1/chat/completions", chat(), True),
    ("/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 3}, True),
    ("/v1/responses", {"model": "tiny", "input": "Hi", "max_output_tokens": 3}, True),
    ("/v1/messages", {"model": "tiny", "messages": USER, "max_tokens": 3}, True),
    ("/v1/embeddings", {"model": "tiny", "input": "a cat"}, True),
    ("/v1/rerank", {"model": "tiny", "query": "cat", "documents": ["a", "b"]}, True),
    ("/v1/score", {"model": "tiny", "text_1": "cat", "text_2": "dog"}, True),
    # Counting runs nothing through the cache, and vLLM's count_tokens has no such field.
    ("/v1/messages/count_tokens", {"model": "tiny", "messages": USER}, False),
]


@pytest.mark.parametrize(("path", "body", "salted"), ROUTES)
def test_every_route_whose_engine_takes_a_salt_gets_the_same_one(
    server: ProxyServer, fake: FakeVLLM, path: str, body: dict[str, Any], salted: bool
) -> None:
    expected = salt_of(server.base_url, fake, ALICE[0])
    r = post(server.base_url, path, body)
    assert r.status_code == 200, r.text
    got = sent(fake, path)
    if salted:
        assert got["cache_salt"] == expected
    else:
        assert "cache_salt" not in got


def test_a_client_salt_splits_its_own_cache_and_never_reaches_anothers(
    server: ProxyServer, fake: FakeVLLM
) -> None:
    base = server.base_url
    alice, bob = salt_of(base, fake, ALICE[0]), salt_of(base, fake, BOB[0])
    tries = ["x", "y", "bob", "bob\u2028", "\u00e9t\u00e9", bob, alice, "a" * 128]
    mine = {c: salt_of(base, fake, ALICE[0], cache_salt=c) for c in tries}
    theirs = {c: salt_of(base, fake, BOB[0], cache_salt=c) for c in tries}
    # Alice's own cache splits by her salt, repeatably.
    assert salt_of(base, fake, ALICE[0], cache_salt="x") == mine["x"]
    assert len(set(mine.values())) == len(tries) and alice not in mine.values()
    # Whatever she sends (Bob's salt as it reaches the engine included), never one of Bob's.
    assert not {bob, *theirs.values()} & {alice, *mine.values()}


@pytest.mark.parametrize("salt", [5, "", "a" * 129, "a/b", "a@b", "a\\b", "a\x00b", ["x"]])
def test_a_salt_vllm_would_refuse_is_refused_here(
    server: ProxyServer, fake: FakeVLLM, salt: Any
) -> None:
    r = post(server.base_url, "/v1/chat/completions", chat(cache_salt=salt))
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "cache_salt" and error["type"] == "invalid_request_error"
    assert not fake.completions


def test_without_isolation_or_without_auth_the_body_is_the_clients(fake: FakeVLLM) -> None:
    unsalted = config(fake, isolate_prefix_cache=False)
    open_ = config(fake)
    del open_["policies"]
    for data, key in ((unsalted, ALICE[0]), (open_, None)):
        with ProxyServer.from_dict(data) as other:
            assert post(other.base_url, "/v1/chat/completions", chat(), key).status_code == 200
            assert "cache_salt" not in sent(fake)
            own = chat(cache_salt="mine", priority=-7)
            assert post(other.base_url, "/v1/chat/completions", own, key).status_code == 200
            got = sent(fake)
            assert got["cache_salt"] == "mine"
            if key is None:
                assert got["priority"] == -7  # no tenants: the client's own, untouched


def test_salts_follow_the_server_secret(fake: FakeVLLM) -> None:
    def alice_salt(secret: str) -> str:
        data = config(fake)
        data["server"]["response_id_secret"] = secret
        with ProxyServer.from_dict(data) as other:
            return salt_of(other.base_url, fake, ALICE[0])

    first = alice_salt("s" * 32)
    # Another process with the same secret (a restart, a second proxy): the same cache.
    assert alice_salt("s" * 32) == first
    assert alice_salt("t" * 32) != first


@pytest.mark.parametrize(
    ("model", "path", "expected"),
    [
        ("tiny", "/v1/chat/completions", -5),  # engine:NAME with scheduling_policy "priority"
        ("remote", "/v1/chat/completions", -5),  # a URL upstream declared "priority"
        ("tiny", "/v1/completions", -5),
        ("tiny", "/v1/responses", -5),
        ("tiny", "/v1/embeddings", -5),
        ("fcfs", "/v1/chat/completions", None),  # not scheduling by priority: never sent
        ("tiny", "/v1/messages", None),  # vLLM's Messages request has no priority field
    ],
)
def test_the_key_priority_reaches_only_engines_scheduling_by_it(
    server: ProxyServer, fake: FakeVLLM, model: str, path: str, expected: int | None
) -> None:
    bodies: dict[str, dict[str, Any]] = {
        "/v1/chat/completions": chat(model),
        "/v1/completions": {"model": model, "prompt": "Hi", "max_tokens": 3},
        "/v1/responses": {"model": model, "input": "Hi", "max_output_tokens": 3},
        "/v1/embeddings": {"model": model, "input": "a cat"},
        "/v1/messages": {"model": model, "messages": USER, "max_tokens": 3},
    }
    # A client's own priority would jump the queue: the key's replaces it, or it goes.
    body = {**bodies[path], "priority": -100}
    r = post(server.base_url, path, body)
    assert r.status_code == 200, r.text
    got = sent(fake)
    if expected is None:
        assert "priority" not in got
    else:
        assert got["priority"] == expected
    r = post(server.base_url, path, bodies[path], BOB[0])
    assert r.status_code == 200
    assert sent(fake).get("priority") == (None if expected is None else 0)


def test_check_config_names_the_new_problems(fake: FakeVLLM) -> None:
    from proxy.core.binder import ConfigError
    from proxy.runtime import load

    data = config(fake)
    data["models"]["tiny"]["upstreams"] = [{"url": "engine:prio", "scheduling_policy": "fcfs"}]
    data["policies"]["auth"]["keys"][0]["priority"] = 2**63
    with pytest.raises(ConfigError) as raised:
        load.from_dict(data, "<test>")
    problems = raised.value.problems
    assert "policies.auth.keys[0].priority: must be a 64-bit integer" in problems
    assert (
        "models.tiny.upstreams[0].scheduling_policy: is the engine's own: set "
        "engines.prio.scheduling_policy" in problems
    )
