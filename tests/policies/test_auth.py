"""auth over real sockets: 401s that cost nothing upstream, keys that never leak, `keys new`."""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from starlette.datastructures import Headers

from policies.auth import AuthPolicy, AuthSettings, KeyEntry, new_key
from proxy.cli.main import main
from proxy.core.errors import AuthenticationFailed
from proxy.telemetry.logs import JsonFormatter
from tests.conftest import ProxyFactory
from tests.fakes.harness import ProxyServer
from tests.fakes.vllm import FakeVLLM
from tests.proxy.helpers import RawClient

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 3}


ALICE = new_key()  # (key, digest) of the key the shared server admits


def config_for(fake: FakeVLLM, *keys: dict[str, object]) -> dict[str, Any]:
    return {
        "server": {"drain_timeout": 1.0},
        "upstream": {"health_interval": 30.0, "metrics_interval": 30.0},
        "models": {
            "tiny": {"upstreams": [fake.base_url]},
            # Served by the same fake under its one name: a second model for allow-lists.
            "other": {"upstreams": [fake.base_url], "served_name": "tiny"},
        },
        "policies": {"order": ["auth"], "auth": {"keys": list(keys)}},
    }


def start(proxy: ProxyFactory, fake: FakeVLLM, *keys: dict[str, object]) -> str:
    return proxy(config=config_for(fake, *keys))


@pytest.fixture(scope="module")
def server(_shared_fake: FakeVLLM) -> Iterator[ProxyServer]:
    """One proxy for the module (startup is most of a test's time); the fake resets per test."""
    config = config_for(_shared_fake, {"name": "alice", "sha256": ALICE[1]})
    with ProxyServer.from_dict(config) as running:
        yield running


@pytest.fixture
def base(server: ProxyServer, fake: FakeVLLM) -> str:
    return server.base_url


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_known_key_is_served(base: str, fake: FakeVLLM) -> None:
    headers = {"authorization": f"Bearer {ALICE[0]}"}
    r = httpx.post(f"{base}/v1/chat/completions", json=BODY, headers=headers)
    assert r.status_code == 200
    # The client's key never travels upstream.
    (sent,) = fake.completions
    assert "authorization" not in sent.headers


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer vg-wrong",
        "Bearer ' OR '1'='1",
        "Bearer '; DROP TABLE keys; --",
        "Bearer " + "A" * 8192,
        "Bearer " + "\u00ff\u00fe" * 10,  # bytes that are not UTF-8 (sent as latin-1)
    ],
)
def test_missing_wrong_and_hostile_keys_get_401(
    base: str, fake: FakeVLLM, value: str | None
) -> None:
    headers = {} if value is None else {"authorization": value.encode("latin-1")}
    r = httpx.post(f"{base}/v1/chat/completions", json=BODY, headers=headers)
    assert_401(r)
    token = (value or "").partition(" ")[2]
    if len(token) > 3:
        assert token not in r.text  # what was sent is never echoed
    assert fake.completions == []


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        # The HTTP parser (httptools) refuses most control characters in a header: 400 before
        # the app sees the request. Tab and a bare scheme reach auth: 401.
        (b"Bearer abc\x01def", 400),
        (b"Bearer \x7f\x7f", 400),
        (b"bearer\x00x", 400),
        (b"Bearer a\tb", 401),
        (b"Bearer ", 401),
    ],
)
def test_control_characters_never_get_500(
    base: str, fake: FakeVLLM, raw: bytes, status: int
) -> None:
    # httpx refuses to send these: write the request bytes ourselves.
    with RawClient(base) as client:
        headers = {"authorization": raw.decode("latin-1")}
        client.send("POST", "/v1/chat/completions", orjson.dumps(BODY), headers)
        got, _, body = client.read_response()
    assert got == status, body
    assert fake.completions == []


def test_every_byte_value_in_a_key_is_refused_cleanly(api_key: tuple[str, str]) -> None:
    # What the HTTP parser lets through or not, the policy itself must never fail on any byte.
    settings = AuthSettings(
        keys=[KeyEntry(name="a", sha256=api_key[1])], isolate_prefix_cache=False
    )
    policy = AuthPolicy(settings, None, None)  # type: ignore[arg-type]
    for value in [bytes([b]) * 3 for b in range(256)] + [b"\xff" * 8192, b"\r\n", b""]:
        headers = Headers(raw=[(b"authorization", b"Bearer " + value)])
        with pytest.raises(AuthenticationFailed):
            policy.authenticate(headers)
    good = Headers(raw=[(b"authorization", f"Bearer {api_key[0]}".encode())])
    assert policy.authenticate(good).name == "a"


def test_unknown_model_without_key_is_401_not_404(base: str) -> None:
    r = httpx.post(f"{base}/v1/chat/completions", json={**BODY, "model": "secret-model"})
    assert_401(r)


def test_unknown_model_with_key_is_404(base: str) -> None:
    headers = {"authorization": f"Bearer {ALICE[0]}"}
    r = httpx.post(f"{base}/v1/chat/completions", json={**BODY, "model": "nope"}, headers=headers)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


def test_models_outside_the_keys_list_do_not_exist_for_it(
    proxy: ProxyFactory, fake: FakeVLLM, api_key: tuple[str, str]
) -> None:
    base = start(proxy, fake, {"name": "bob", "sha256": api_key[1], "models": ["tiny"]})
    headers = {"authorization": f"Bearer {api_key[0]}"}
    ok = httpx.post(f"{base}/v1/chat/completions", json=BODY, headers=headers)
    assert ok.status_code == 200
    other = httpx.post(
        f"{base}/v1/chat/completions", json={**BODY, "model": "other"}, headers=headers
    )
    assert other.status_code == 404
    assert other.json()["error"]["code"] == "model_not_found"
    assert len(fake.completions) == 1
    models = httpx.get(f"{base}/v1/models", headers=headers)
    assert [m["id"] for m in models.json()["data"]] == ["tiny"]


def test_models_list_needs_a_key(base: str) -> None:
    assert_401(httpx.get(f"{base}/v1/models"))
    assert_401(httpx.get(f"{base}/v1/models", headers={"authorization": "Bearer nope"}))
    r = httpx.get(f"{base}/v1/models", headers={"authorization": f"Bearer {ALICE[0]}"})
    assert sorted(m["id"] for m in r.json()["data"]) == ["other", "tiny"]


def test_keys_never_reach_logs_metrics_or_bodies(
    base: str, caplog: pytest.LogCaptureFixture
) -> None:
    key, digest = ALICE
    caplog.set_level(logging.DEBUG)
    good, bad = {"authorization": f"Bearer {key}"}, {"authorization": f"Bearer {key}x"}
    url = f"{base}/v1/chat/completions"
    bodies = [
        httpx.post(url, json=BODY, headers=good).text,
        httpx.post(url, json=BODY, headers=bad).text,
        httpx.post(url, json={**BODY, "model": "x"}, headers=good).text,
        httpx.get(f"{base}/metrics").text,
    ]
    formatter = JsonFormatter()
    logged = [formatter.format(r) + repr(vars(r)) for r in caplog.records]
    assert any("alice" in line for line in logged)  # the request log names the caller
    for text in bodies + logged:
        assert key not in text
        assert digest not in text


def test_openai_sdk_gets_authentication_error(base: str) -> None:
    messages: Any = BODY["messages"]
    with (
        openai.OpenAI(base_url=f"{base}/v1", api_key="vg-wrong", max_retries=2) as client,
        pytest.raises(openai.AuthenticationError),
    ):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    with openai.OpenAI(base_url=f"{base}/v1", api_key=ALICE[0], max_retries=0) as client:
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
        assert reply.choices[0].message.content


def test_keys_new_prints_a_key_and_a_config_line_that_works(
    proxy: ProxyFactory, fake: FakeVLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "new", "carol", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    (key,) = re.findall(r"^\s+(vg-\S+)$", out, re.M)
    (line,) = [x.strip() for x in out.splitlines() if x.strip().startswith("{ name")]
    entry = tomllib.loads(f"keys = [{line.rstrip(',')}]")["keys"][0]
    assert entry["name"] == "carol" and entry["models"] == ["tiny"]
    assert key not in line
    base = start(proxy, fake, entry)
    r = httpx.post(
        f"{base}/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {key}"}
    )
    assert r.status_code == 200


def test_keys_new_refuses_a_bad_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new", "has space"]) == 2


def test_check_config_reports_auth_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "vgate.toml"
    path.write_text(
        """
[models.tiny]
upstreams = ["http://127.0.0.1:9"]

[policies]
order = ["auth", "auth", "nope"]

[policies.auth]
keys = [
  { name = "a", sha256 = "not-a-digest" },
  { name = "b", sha256 = "DIGEST", models = ["ghost"] },
  { name = "b", sha256 = "DIGEST" },
]
""".replace("DIGEST", "a" * 64)
    )
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "policies.order[1]: 'auth' is listed twice" in err
    assert "policies.order[2]: unknown policy 'nope'" in err
    assert "policies.auth.keys[0].sha256: must be a SHA-256 digest" in err
    # Cross checks run once the table binds; fix the digest and they show.
    path.write_text(
        path.read_text()
        .replace("not-a-digest", "b" * 64)
        .replace('"auth", "auth", "nope"', '"auth"')
    )
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "policies.auth.keys[1].models[0]: model 'ghost' is not configured" in err
    assert "policies.auth.keys[2].name: 'b' is used by another key" in err
    assert "policies.auth.keys[2].sha256: the same key is configured twice" in err
