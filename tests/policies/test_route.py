"""Precision routing over real sockets: two fake engines, the quantized `tiny` and the full
precision `tiny-fp16`, each recording what it received; which one got a request is the answer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from policies.auth import new_key
from tests.fakes.harness import ProxyServer
from tests.fakes.vllm import FakeVLLM
from tests.observability.helpers import capture_logs, scrape, value

ALICE = new_key()  # every model
BOB = new_key()  # `tiny` only: never routed
USER = [{"role": "user", "content": "Say hello"}]
TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


def config(quantized: FakeVLLM, full: FakeVLLM, **route: Any) -> dict[str, Any]:
    return {
        "server": {"drain_timeout": 1.0},
        "upstream": {"health_interval": 30.0, "metrics_interval": 30.0},
        "admin": {"enabled": True, "port": 0},
        "models": {
            "tiny": {"upstreams": [quantized.base_url]},
            "tiny-fp16": {"upstreams": [full.base_url]},
        },
        "policies": {
            "order": ["auth", "route"],
            "auth": {
                "keys": [
                    {"name": "alice", "sha256": ALICE[1]},
                    {"name": "bob", "sha256": BOB[1], "models": ["tiny"]},
                ]
            },
            "route": {"rules": [{"model": "tiny", "to": "tiny-fp16"}], **route},
        },
    }


@pytest.fixture(scope="module")
def full() -> Iterator[FakeVLLM]:
    with FakeVLLM(model="tiny-fp16") as engine:
        yield engine


@pytest.fixture(scope="module")
def server(_shared_fake: FakeVLLM, full: FakeVLLM) -> Iterator[ProxyServer]:
    with ProxyServer.from_dict(config(_shared_fake, full)) as running:
        yield running


@pytest.fixture
def engines(fake: FakeVLLM, full: FakeVLLM) -> tuple[FakeVLLM, FakeVLLM]:
    full.reset()
    return fake, full


def post(
    server: ProxyServer, path: str, body: dict[str, Any], key: str = ALICE[0], **headers: str
) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}", **headers}
    return httpx.post(f"{server.base_url}{path}", json=body, headers=headers, timeout=10)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": USER, "max_tokens": 3, **fields}


def responses(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "input": "Say hello", "max_output_tokens": 3, **fields}


def messages(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": USER, "max_tokens": 3, **fields}


FUNCTION = {"type": "function", "name": "f", "parameters": {}}  # a Responses tool
ANTHROPIC_TOOL = {"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}

# (path, body, why it goes to full precision, or None: it stays quantized)
CASES = [
    ("/v1/chat/completions", chat(tools=[TOOL]), "tools"),
    ("/v1/chat/completions", chat(response_format=JSON_FORMAT), "json"),
    ("/v1/chat/completions", chat(response_format={"type": "json_object"}), "json"),
    ("/v1/chat/completions", chat(structured_outputs={"json": SCHEMA}), "json"),
    ("/v1/chat/completions", chat(), None),
    ("/v1/chat/completions", chat(tools=[]), None),
    ("/v1/chat/completions", chat(response_format={"type": "text"}), None),
    (
        "/v1/completions",
        {"model": "tiny", "prompt": "Hi", "max_tokens": 3, "response_format": JSON_FORMAT},
        "json",
    ),
    ("/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 3}, None),
    ("/v1/responses", responses(tools=[FUNCTION]), "tools"),
    (
        "/v1/responses",
        responses(text={"format": {"type": "json_schema", "name": "city", "schema": SCHEMA}}),
        "json",
    ),
    ("/v1/responses", responses(text={"format": {"type": "text"}}), None),
    ("/v1/responses", responses(), None),
    ("/v1/messages", messages(tools=[ANTHROPIC_TOOL]), "tools"),
    (
        "/v1/messages",
        messages(output_config={"format": {"type": "json_schema", "schema": SCHEMA}}),
        "json",
    ),
    ("/v1/messages", messages(), None),
]


@pytest.mark.parametrize(("path", "body", "reason"), CASES)
def test_requests_that_bind_their_output_reach_full_precision(
    server: ProxyServer,
    engines: tuple[FakeVLLM, FakeVLLM],
    path: str,
    body: dict[str, Any],
    reason: str | None,
) -> None:
    quantized, full = engines
    labels = {"model": "tiny", "target": "tiny-fp16", "reason": reason or "tools"}
    before = value(scrape(server), "vgate_routed_total", **labels) or 0.0
    r = post(server, path, body)
    assert r.status_code == 200, r.text
    served, idle = (full, quantized) if reason else (quantized, full)
    (seen,) = served.completions
    assert not idle.completions
    assert seen.body["model"] == served.model  # the served model's own name upstream
    assert r.headers["x-vgate-upstream"] == f"{served.base_url} {served.model}"
    after = value(scrape(server), "vgate_routed_total", **labels) or 0.0
    assert after - before == (1 if reason else 0)


def test_a_stream_is_routed_too(server: ProxyServer, engines: tuple[FakeVLLM, FakeVLLM]) -> None:
    quantized, full = engines
    headers = {"authorization": f"Bearer {ALICE[0]}"}
    body = chat(tools=[TOOL], stream=True)
    with httpx.stream(
        "POST", f"{server.base_url}/v1/chat/completions", json=body, headers=headers
    ) as r:
        assert r.status_code == 200
        assert r.headers["x-vgate-upstream"] == f"{full.base_url} tiny-fp16"
        text = r.read().decode()
    assert text.rstrip().endswith("data: [DONE]")
    assert len(full.completions) == 1 and not quantized.completions


@pytest.mark.parametrize("value_", ["full", "FULL", "Full"])
def test_the_header_asks_for_full_precision(
    server: ProxyServer, engines: tuple[FakeVLLM, FakeVLLM], value_: str
) -> None:
    quantized, full = engines
    r = post(server, "/v1/chat/completions", chat(), **{"x-vgate-precision": value_})
    assert r.status_code == 200
    assert r.headers["x-vgate-upstream"].endswith(" tiny-fp16")
    (seen,) = full.completions
    # Only headers vgate chooses leave: the engine never sees ours.
    assert "x-vgate-precision" not in seen.headers
    assert not quantized.completions


def test_auto_leaves_the_decision_to_the_content(
    server: ProxyServer, engines: tuple[FakeVLLM, FakeVLLM]
) -> None:
    quantized, full = engines
    assert post(server, "/v1/chat/completions", chat(), **{"x-vgate-precision": "auto"}).is_success
    assert len(quantized.completions) == 1 and not full.completions


def test_the_metadata_tag_asks_and_leaves_the_body(
    server: ProxyServer, engines: tuple[FakeVLLM, FakeVLLM]
) -> None:
    quantized, full = engines
    tagged = responses(metadata={"vgate_precision": "full", "team": "search"})
    assert post(server, "/v1/responses", tagged).status_code == 200
    only_tag = chat(metadata={"vgate_precision": "full"})
    assert post(server, "/v1/chat/completions", only_tag).status_code == 200
    first, second = full.completions
    assert first.body["metadata"] == {"team": "search"}
    assert "metadata" not in second.body
    assert not quantized.completions
    labels = {"model": "tiny", "target": "tiny-fp16", "reason": "metadata"}
    assert (value(scrape(server), "vgate_routed_total", **labels) or 0) >= 2


@pytest.mark.parametrize(
    ("path", "shape"),
    [("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")],
)
def test_a_bad_value_is_refused_and_nothing_is_forwarded(
    server: ProxyServer, engines: tuple[FakeVLLM, FakeVLLM], path: str, shape: str
) -> None:
    quantized, full = engines
    r = post(server, path, chat(), **{"x-vgate-precision": "fulll"})
    assert r.status_code == 400
    error = r.json()["error"]
    if shape == "openai":
        assert error["param"] == "x-vgate-precision" and error["type"] == "invalid_request_error"
    assert "'full' or 'auto'" in error["message"]
    r = post(server, "/v1/chat/completions", chat(metadata={"vgate_precision": 1}))
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "metadata.vgate_precision"
    assert not quantized.completions and not full.completions


def test_a_key_that_may_not_use_the_target_stays(
    server: ProxyServer, engines: tuple[FakeVLLM, FakeVLLM]
) -> None:
    quantized, full = engines
    with capture_logs() as logs:
        r = post(
            server,
            "/v1/chat/completions",
            chat(tools=[TOOL]),
            key=BOB[0],
            **{"x-request-id": "bob"},
        )
        assert r.status_code == 200
        assert r.headers["x-vgate-upstream"] == f"{quantized.base_url} tiny"
        scrape(server)  # flushes the batch of request lines
    assert len(quantized.completions) == 1 and not full.completions
    (line,) = [rec for rec in logs.json() if rec.get("request_id") == "bob"]
    assert line["route_skipped"] == "not_allowed" and "routed" not in line


def test_the_log_line_says_why(server: ProxyServer, engines: tuple[FakeVLLM, FakeVLLM]) -> None:
    with capture_logs() as logs:
        tools = chat(tools=[TOOL])
        assert post(server, "/v1/chat/completions", tools, **{"x-request-id": "why"}).is_success
        scrape(server)  # flushes the batch of request lines
    (line,) = [rec for rec in logs.json() if rec.get("request_id") == "why"]
    assert line["model"] == "tiny"  # as the client sent it
    assert (line["routed"], line["routed_to"]) == ("tools", "tiny-fp16")
    assert line["upstream"].endswith(" tiny-fp16")


def test_a_continuation_goes_where_its_response_is(
    server: ProxyServer, engines: tuple[FakeVLLM, FakeVLLM]
) -> None:
    quantized, full = engines
    function = FUNCTION
    # Started with tools: full precision holds it; the follow-up has none and goes there too.
    first = post(server, "/v1/responses", responses(tools=[function]))
    assert first.headers["x-vgate-upstream"].endswith(" tiny-fp16")
    follow = post(server, "/v1/responses", responses(previous_response_id=first.json()["id"]))
    assert follow.status_code == 200, follow.text
    assert follow.headers["x-vgate-upstream"].endswith(" tiny-fp16")
    # Started plain on the quantized model: a follow-up with tools stays there.
    plain = post(server, "/v1/responses", responses())
    assert plain.headers["x-vgate-upstream"].endswith(" tiny")
    tooled = responses(previous_response_id=plain.json()["id"], tools=[function])
    again = post(server, "/v1/responses", tooled)
    assert again.status_code == 200, again.text
    assert again.headers["x-vgate-upstream"].endswith(" tiny")
    assert len(full.completions) == 2 and len(quantized.completions) == 2
    samples = scrape(server)
    reason = {"model": "tiny", "target": "tiny-fp16", "reason": "previous_response"}
    assert (value(samples, "vgate_routed_total", **reason) or 0) >= 1


def test_a_rule_can_listen_to_some_triggers_only(
    _shared_fake: FakeVLLM, engines: tuple[FakeVLLM, FakeVLLM]
) -> None:
    quantized, full = engines
    data = config(quantized, full)
    data["policies"]["route"]["rules"] = [{"model": "tiny", "to": "tiny-fp16", "when": ["header"]}]
    with ProxyServer.from_dict(data) as other:
        assert post(other, "/v1/chat/completions", chat(tools=[TOOL])).is_success
        assert len(quantized.completions) == 1 and not full.completions
        r = post(other, "/v1/chat/completions", chat(), **{"x-vgate-precision": "full"})
        assert r.headers["x-vgate-upstream"].endswith(" tiny-fp16")


CHECKED = """
[models.a]
upstreams = ["http://127.0.0.1:9"]
[models.b]
upstreams = ["http://127.0.0.1:9"]
[models.c]
upstreams = ["http://127.0.0.1:9"]
policies = ["route"]

[policies]
order = ["route", "auth"]

[policies.auth]
keys = [{ name = "k", sha256 = "%s" }]

[policies.route]
header = "bad header"
rules = [
  { model = "a", to = "b" },
  { model = "b", to = "a" },
  { model = "c", to = "a", when = [] },
  { model = "c", to = "ghost", when = ["tools", "smell"] },
  { model = "b", to = "b" },
]
""" % ("a" * 64)


def test_check_config_names_every_routing_problem(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.cli.main import main

    path = tmp_path / "vgate.toml"
    path.write_text(CHECKED)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "models.c.policies[0]: 'route' already runs for every model" in err
    assert "policies.order: 'route' must come after 'auth'" in err
    assert "policies.route.header: must be an HTTP header name" in err
    assert "policies.route.rules[2].when: must name at least one of" in err
    assert "policies.route.rules[3].when[1]: must be one of 'header', 'metadata'" in err
    # The table's own problems first; fixed, the checks across the config show.
    path.write_text(
        CHECKED.replace('header = "bad header"', "")
        .replace("when = []", 'when = ["json"]')
        .replace(', "smell"', "")
    )
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "policies.route.rules[0]: cycle: a -> b -> a" in err
    assert "policies.route.rules[1]: cycle: b -> a -> b" in err
    assert "policies.route.rules[2].to: 'a' is routed itself (c -> a -> b -> a)" in err
    assert "policies.route.rules[3].to: model 'ghost' is not configured" in err
    assert "policies.route.rules[3].model: 'c' has another rule" in err
    assert "policies.route.rules[4].to: is the rule's own model" in err
    assert "policies.route.rules[4].model: 'b' has another rule" in err
    path.write_text(CHECKED.replace('order = ["route", "auth"]', 'order = ["auth"]'))
    assert main(["check-config", str(path)]) == 2
    assert "models.c.policies: 'route' goes in [policies] order" in capsys.readouterr().err
