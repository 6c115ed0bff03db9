"""https:// upstreams on the hot path and the control plane, against a real TLS server.

An https upstream is verified against the system trust store by default, or the upstream's
`ca_file`; `verify = false` encrypts without authenticating. Whatever the setting, probes (and
so /ready) trust exactly what requests trust: a certificate the hot path refuses is never a
green /ready beside failing completions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ProxyFactory
from tests.fakes.harness import proxy_config
from tests.fakes.vllm import FakeVLLM
from tests.proxy.helpers import CHAT_PATH, chat, events
from tests.proxy.tls import Certs, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_fake(certs: Certs) -> Iterator[FakeVLLM]:
    with FakeVLLM(ssl_context=certs.server_context()) as fake:
        yield fake


def _config(entry: dict[str, Any]) -> dict[str, Any]:
    data = proxy_config("unused", upstream={"health_interval": 0.2})
    data["models"]["tiny"]["upstreams"] = [entry]
    return data


def _ready(base: str) -> httpx.Response:
    return httpx.get(f"{base}/ready", timeout=5)


def _wait_ready(base: str) -> httpx.Response:
    # Probes run every 0.2 s: the first that succeeds turns /ready green.
    deadline = time.monotonic() + 5
    while (r := _ready(base)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    return r


def test_a_ca_file_upstream_serves_whole_and_streamed_answers(
    proxy: ProxyFactory, tls_fake: FakeVLLM, certs: Certs
) -> None:
    base = proxy(config=_config({"url": tls_fake.base_url, "ca_file": str(certs.ca)}))
    assert _wait_ready(base).status_code == 200
    r = httpx.post(base + CHAT_PATH, json=chat(), timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert r.headers["x-vgate-upstream"] == f"{tls_fake.base_url} tiny"
    s = httpx.post(base + CHAT_PATH, json=chat(6, stream=True), timeout=10)
    assert s.status_code == 200
    assert events(s.content)[-1] == b"[DONE]"
    assert any(seen.path == CHAT_PATH for seen in tls_fake.seen.requests)


def test_the_system_trust_store_refuses_a_private_ca_and_ready_says_so(
    proxy: ProxyFactory, tls_fake: FakeVLLM
) -> None:
    base = proxy(config=_config({"url": tls_fake.base_url}))
    r = httpx.post(base + CHAT_PATH, json=chat(), timeout=10)
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_unreachable"
    ready = _ready(base)
    assert ready.status_code == 503  # the probe refused the certificate too
    assert "certificate" in ready.json()["models"]["tiny"].lower()


def test_verify_false_encrypts_without_checking(proxy: ProxyFactory, tls_fake: FakeVLLM) -> None:
    base = proxy(config=_config({"url": tls_fake.base_url, "verify": False}))
    assert _wait_ready(base).status_code == 200
    r = httpx.post(base + CHAT_PATH, json=chat(), timeout=10)
    assert r.status_code == 200, r.text


def test_a_certificate_for_another_host_name_is_refused(
    proxy: ProxyFactory, tmp_path: Path
) -> None:
    other = make_certs(tmp_path, names="DNS:engine.example")
    with FakeVLLM(ssl_context=other.server_context()) as fake:
        base = proxy(config=_config({"url": fake.base_url, "ca_file": str(other.ca)}))
        r = httpx.post(base + CHAT_PATH, json=chat(), timeout=10)
        assert r.status_code == 502
        assert fake.seen.requests == []  # nothing was sent to the wrong host
        relaxed = proxy(config=_config({"url": fake.base_url, "verify": False}))
        assert httpx.post(relaxed + CHAT_PATH, json=chat(), timeout=10).status_code == 200


def test_tls_settings_on_a_plain_http_upstream_are_a_config_error(fake: FakeVLLM) -> None:
    from proxy.core.binder import ConfigError
    from proxy.runtime.load import from_dict

    with pytest.raises(ConfigError) as info:
        from_dict(_config({"url": fake.base_url, "verify": False}))
    assert any("apply to https:// upstreams only" in p for p in info.value.problems)
    with pytest.raises(ConfigError) as info:
        from_dict(_config({"url": "https://127.0.0.1:1", "ca_file": "/nonexistent.pem"}))
    assert any("ca_file" in p and "not a readable file" in p for p in info.value.problems)
