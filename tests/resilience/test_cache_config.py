"""`[cache]` and the `slow_call` breaker in the config: the README's examples load as written, and
check-config names every bad key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from proxy.cli.main import main
from proxy.runtime.load import from_dict
from proxy.upstream.registry import resolve
from proxy.upstream.slo_breaker import SlowCallSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(marker: str) -> str:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, marker
    return found[0]


def test_the_documented_slow_call_example_loads() -> None:
    data = tomllib.loads(readme_block('kind = "slow_call"'))
    data["models"]["chat-8b"] = {"upstreams": ["http://10.0.0.22:8000"]}
    found = resolve(from_dict(data, "README.md"))
    assert found.breaker_settings == SlowCallSettings(
        min_calls=10, slow_call_duration=2.0, half_open_calls=3
    )


def test_the_documented_cache_example_loads_with_the_defaults() -> None:
    data = tomllib.loads(readme_block("[cache]\nenabled = true"))
    cfg = from_dict({**data, "models": {"m": {"upstreams": ["http://127.0.0.1:9"]}}})
    assert cfg.cache.enabled and cfg.cache.storage == "memory"
    defaults = from_dict({"models": {"m": {"upstreams": ["http://127.0.0.1:9"]}}}).cache
    assert cfg.cache == type(defaults)(**{**vars(defaults), "enabled": True})
    assert defaults.enabled is False


def test_check_config_names_every_bad_cache_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "vgate.toml"
    path.write_text(
        """
[models.tiny]
upstreams = ["http://127.0.0.1:9"]

[cache]
enabled = "yes"
storage = "file:///tmp/cache"
ttl = 0
shared = true
"""
    )
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cache.enabled: must be a boolean" in err
    assert "cache.storage: must be 'memory' or a redis:// (rediss://, unix://) URL" in err
    assert "cache.ttl: must be greater than 0" in err
    assert "cache.shared: unknown key" in err
    # Checks across keys run once the tables bind.
    path.write_text(
        """
[models.tiny]
upstreams = ["http://127.0.0.1:9"]

[cache]
max_bytes = 1000
max_entry_bytes = 2000

[resilience.breaker]
kind = "slow_call"
window_size = 5
min_calls = 6
"""
    )
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cache.max_entry_bytes: 2000 is more than cache.max_bytes (1000)" in err
    assert "resilience.breaker.min_calls: 6 is more than window_size (5)" in err
