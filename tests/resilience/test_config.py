"""The [resilience] section and model fallbacks: validated at load, with readable problems."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from proxy.core.binder import ConfigError
from proxy.core.config import Config
from proxy.runtime.load import from_dict
from proxy.upstream.registry import OrderedFallbacks, resolve


def fallback_chain(cfg: Config, name: str) -> list[str]:
    return OrderedFallbacks(cfg).chain(name)


# The worked example of docs-drafts/resilience.md.
EXAMPLE = """
[models.chat-8k]
upstreams = ["http://10.0.0.11:8000", "http://10.0.0.12:8000"]
served_name = "llama-3.1-8b"
fallbacks = ["chat-32k"]

[models.chat-32k]
upstreams = ["http://10.0.0.13:8000"]
served_name = "llama-3.1-8b-32k"

[resilience]
affinity = "prefix"
affinity_messages = 2
max_fallback_depth = 2

[resilience.breaker]
enabled = true
fail_max = 5
reset_timeout = 30.0
half_open_max = 1

[resilience.retry]
attempts = 3
deadline = 30.0
attempt_timeout = 120.0
backoff_base = 0.025
backoff_max = 0.25
budget_ratio = 0.2
budget_min = 3

[resilience.backpressure]
max_inflight = 64
queue_size = 128
max_queue_wait = 5.0
kv_cache_threshold = 0.85
protected_priority = 1
retry_after = 1
"""


def models(**fallbacks: list[str]) -> dict[str, Any]:
    return {
        name: {"upstreams": ["http://127.0.0.1:9"], "fallbacks": chain}
        for name, chain in fallbacks.items()
    }


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_dict(data, "vgate.toml")
    return info.value.problems


def test_the_documented_example_loads() -> None:
    cfg = from_dict(tomllib.loads(EXAMPLE), "example.toml")
    assert cfg.resilience.backpressure.max_inflight == 64
    assert resolve(cfg).retry_settings.attempt_timeout == 120.0
    assert fallback_chain(cfg, "chat-8k") == ["chat-8k", "chat-32k"]


def test_defaults() -> None:
    cfg = from_dict({"models": models(a=[])})
    r = cfg.resilience
    modules = resolve(cfg)
    breaker, retry = modules.breaker_settings, modules.retry_settings
    assert (breaker.fail_max, breaker.half_open_max, retry.attempts) == (5, 1, 3)
    assert retry.attempt_timeout is None
    assert (r.balancer, r.fallback) == ("least_outstanding", "ordered")
    assert r.backpressure.kv_cache_threshold == 0.85
    assert r.affinity == "none"


def test_fallback_to_itself_or_an_unknown_model_is_refused() -> None:
    found = problems({"models": models(a=["a", "nope"])})
    assert "models.a.fallbacks[0]: 'a' is the model itself" in found
    assert "models.a.fallbacks[1]: 'nope' is not a configured model" in found


def test_fallback_cycles_are_refused_with_the_loop_named() -> None:
    found = problems({"models": models(a=["b"], b=["c"], c=["a"], d=["a"])})
    assert "models.a.fallbacks: cycle: a -> b -> c -> a" in found
    assert "models.b.fallbacks: cycle: b -> c -> a -> b" in found
    assert not any(p.startswith("models.d.") for p in found)  # leads into it, is not part


def test_chains_follow_fallbacks_depth_first_without_repeats_and_bounded() -> None:
    data = {"models": models(a=["b", "c"], b=["d", "c"], c=[], d=["e"], e=[])}
    cfg = from_dict(data)
    assert fallback_chain(cfg, "a") == ["a", "b", "d", "e"]  # depth 3 by default
    data["resilience"] = {"max_fallback_depth": 1}
    assert fallback_chain(from_dict(data), "a") == ["a", "b"]
    data["resilience"] = {"max_fallback_depth": 10}
    assert fallback_chain(from_dict(data), "a") == ["a", "b", "d", "e", "c"]


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"breaker": {"fail_max": 0}}, "resilience.breaker.fail_max: must be greater than 0"),
        (
            {"backpressure": {"kv_cache_threshold": 1.5}},
            "resilience.backpressure.kv_cache_threshold: must be in (0, 1]",
        ),
        ({"retry": {"attempt_timeout": -1}}, "resilience.retry.attempt_timeout: must be greater"),
        ({"affinity": "sticky"}, "resilience.affinity: must be one of 'none', 'prefix'"),
        ({"retry": {"tries": 3}}, "resilience.retry.tries: unknown key"),
        ({"breaker": {"kind": "slow"}}, "resilience.breaker.kind: unknown 'slow'"),
        ({"balancer": "random"}, "resilience.balancer: unknown 'random'"),
    ],
)
def test_bad_values_name_the_key(table: dict[str, Any], expected: str) -> None:
    found = problems({"models": models(a=[]), "resilience": table})
    assert any(p.startswith(expected) for p in found), found
