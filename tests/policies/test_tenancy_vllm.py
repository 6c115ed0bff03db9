"""Tenant isolation and key priority against a real vLLM CPU engine with priority scheduling:
the salt and the priority vgate adds are accepted on every generating route, and two keys
sending the same prompt do not share prefix-cache entries (vLLM's own hit counter says so)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.client import exposition
from policies.auth import new_key
from tests.fakes.harness import ProxyServer, proxy_config
from tests.vllm_fixtures import VllmServer, engine_config, serve

pytestmark = pytest.mark.vllm

ALICE = new_key()
BOB = new_key()
USER = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def priority_engine(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[VllmServer]:
    """The one engine start of this module: the dev model, scheduling by priority."""
    work = tmp_path_factory.mktemp("vllm-priority")
    cfg = engine_config(
        "tiny", tiny_model_dir, work, scheduling_policy="priority", enable_prefix_caching=True
    )
    yield from serve("tiny", cfg, tiny_model_dir, work)


@pytest.fixture(scope="module")
def proxy_url(priority_engine: VllmServer) -> Iterator[str]:
    data = proxy_config(priority_engine.base_url)
    data["models"]["tiny"] = {
        "upstreams": [{"url": priority_engine.base_url, "scheduling_policy": "priority"}]
    }
    data["upstream"]["first_byte_timeout"] = 120.0
    data["policies"] = {
        "order": ["auth"],
        "auth": {
            "keys": [
                {"name": "alice", "sha256": ALICE[1], "priority": 5},
                {"name": "bob", "sha256": BOB[1], "priority": -3},
            ]
        },
    }
    with ProxyServer.from_dict(data) as server:
        yield server.base_url


def post(base: str, path: str, body: dict[str, Any], key: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    return httpx.post(f"{base}{path}", json=body, headers=headers, timeout=120)


BODIES = {
    "/v1/chat/completions": {"model": "tiny", "messages": USER, "max_tokens": 2},
    "/v1/completions": {"model": "tiny", "prompt": "Hello", "max_tokens": 2},
    "/v1/responses": {"model": "tiny", "input": "Hello", "max_output_tokens": 2, "store": False},
    "/v1/messages": {"model": "tiny", "messages": USER, "max_tokens": 2},
}


def prefix_hits(engine: VllmServer) -> float:
    text = httpx.get(f"{engine.base_url}/metrics", timeout=10).text
    return sum(s.value for s in exposition.parse(text) if s.name == "vllm:prefix_cache_hits_total")


def test_salt_and_priority_are_accepted_and_keep_tenants_apart(
    proxy_url: str, priority_engine: VllmServer
) -> None:
    # Every generating route, with the key's priority (-5 and 3 on the engine) and the
    # tenant's salt, a client salt combined into it on one of them.
    for path, body in BODIES.items():
        for key in (ALICE[0], BOB[0]):
            r = post(proxy_url, path, body, key)
            assert r.status_code == 200, (path, r.text)
        r = post(proxy_url, path, {**body, "cache_salt": "mine", "priority": -99}, ALICE[0])
        assert r.status_code == 200, (path, r.text)
    # The same long prompt: a second time for the same key hits the prefix cache, for
    # another key it does not, and the first key's entries are still there afterwards.
    prompt = {"model": "tiny", "prompt": "the quick brown fox " * 60, "max_tokens": 1}
    start = prefix_hits(priority_engine)
    assert post(proxy_url, "/v1/completions", prompt, ALICE[0]).status_code == 200
    assert prefix_hits(priority_engine) == start  # new to the engine
    assert post(proxy_url, "/v1/completions", prompt, ALICE[0]).status_code == 200
    warm = prefix_hits(priority_engine)
    assert warm > start
    assert post(proxy_url, "/v1/completions", prompt, BOB[0]).status_code == 200
    assert prefix_hits(priority_engine) == warm
    assert post(proxy_url, "/v1/completions", prompt, ALICE[0]).status_code == 200
    assert prefix_hits(priority_engine) > warm
