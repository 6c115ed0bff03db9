"""The attempt-level seams are pluggable: a balancer or a breaker is one class and one registry
line, chosen in config and checked by check-config like every built-in."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
import pytest

from proxy.core.binder import ConfigError, check, positive
from proxy.core.errors import CircuitOpen
from proxy.runtime.load import from_dict
from proxy.upstream import registry
from proxy.upstream.modules import C
from tests.proxy.helpers import CHAT_PATH, chat
from tests.resilience.conftest import FakeFactory, GatewayFactory, config


class LastListed:
    """Always the last eligible upstream: nothing a built-in would do."""

    def select(self, candidates: Sequence[C], key: int | None) -> C | None:
        return candidates[-1] if candidates else None


@dataclass(frozen=True, kw_only=True)
class BudgetSettings:
    calls: int = check(positive, 2)


class CallBudget:
    """Opens for good after `calls` admitted calls (a deliberately odd breaker)."""

    settings_class: ClassVar[type[Any]] = BudgetSettings

    def __init__(self, name: str, calls: int) -> None:
        self.name, self.left, self.trips, self.rejected = name, calls, 0, 0

    @classmethod
    def from_settings(cls, name: str, settings: BudgetSettings) -> CallBudget:
        return cls(name, settings.calls)

    @property
    def current_state(self) -> str:
        return "closed" if self.left > 0 else "open"

    def allows(self) -> bool:
        return self.left > 0

    def admit(self) -> bool:
        if self.left <= 0:
            self.rejected += 1
            raise CircuitOpen(f"{self.name}: budget spent", headers={"retry-after": "1"})
        self.left -= 1
        return False

    def success(self, probe: bool, elapsed: float) -> None:
        pass

    def failure(self, probe: bool) -> None:
        pass

    def release(self, probe: bool) -> None:
        pass

    def retry_in(self) -> float:
        return 60.0


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(registry.BALANCERS, "last_listed", LastListed)
    monkeypatch.setitem(registry.BREAKERS, "call_budget", CallBudget)
    yield


def test_a_registered_balancer_is_used(
    registered: None, fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    a, b = fakes(), fakes()
    gw = gateway(
        config({"tiny": {"upstreams": [a.base_url, b.base_url]}}, {"balancer": "last_listed"})
    )
    for _ in range(4):
        assert httpx.post(gw.base_url + CHAT_PATH, json=chat(), timeout=10).status_code == 200
    assert len(b.requests_to(CHAT_PATH)) == 4 and a.requests_to(CHAT_PATH) == []


def test_a_registered_breaker_is_built_per_upstream_with_its_settings(
    registered: None, fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    fake = fakes()
    resilience = {"breaker": {"kind": "call_budget", "calls": 2}, "retry": {"attempts": 1}}
    gw = gateway(config({"tiny": {"upstreams": [fake.base_url]}}, resilience))
    codes = [
        httpx.post(gw.base_url + CHAT_PATH, json=chat(), timeout=10).status_code for _ in range(3)
    ]
    assert codes == [200, 200, 503]
    assert isinstance(gw.upstream().breaker, CallBudget)


def test_a_module_s_settings_are_checked_like_any_table(registered: None) -> None:
    base = {"models": {"tiny": {"upstreams": ["http://127.0.0.1:9"]}}}
    with pytest.raises(ConfigError) as info:
        from_dict({**base, "resilience": {"breaker": {"kind": "call_budget", "calls": 0}}})
    assert "resilience.breaker.calls: must be greater than 0" in info.value.problems
    with pytest.raises(ConfigError) as info:
        from_dict({**base, "resilience": {"breaker": {"kind": "call_budget", "fail_max": 3}}})
    assert any(
        p.startswith("resilience.breaker.fail_max: unknown key") for p in info.value.problems
    )
