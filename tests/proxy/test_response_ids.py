"""Response ids that lead back to the engine that stored the response, and only for its owner:
through the real proxy in front of two fake engines (each with its own Responses store), with
two API keys."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from policies.auth import new_key
from proxy.runtime.response_ids import ResponseIds
from proxy.upstream.model import ModelRoute, Upstream
from tests.fakes.harness import ProxyServer
from tests.fakes.sse_read import typed_events
from tests.fakes.vllm import FakeVLLM

ALICE, BOB = new_key(), new_key()
SECRET = "s" * 32


@pytest.fixture
def engines() -> Iterator[tuple[FakeVLLM, FakeVLLM]]:
    with FakeVLLM() as a, FakeVLLM() as b:
        yield a, b


def config(a: FakeVLLM, b: FakeVLLM, **server: Any) -> dict[str, Any]:
    return {
        "server": {"drain_timeout": 1.0, "response_id_secret": SECRET, **server},
        "upstream": {"health_interval": 30.0, "metrics_interval": 30.0},
        "models": {
            "tiny": {"upstreams": [a.base_url, b.base_url]},
            "solo": {"upstreams": [b.base_url], "served_name": "tiny"},
        },
        "resilience": {"retry": {"attempts": 1}},
        "policies": {
            "order": ["auth"],
            "auth": {
                "keys": [
                    {"name": "alice", "sha256": ALICE[1]},
                    {"name": "bob", "sha256": BOB[1]},
                ]
            },
        },
    }


@pytest.fixture
def proxy(engines: tuple[FakeVLLM, FakeVLLM]) -> Iterator[ProxyServer]:
    with ProxyServer.from_dict(config(*engines)) as server:
        yield server


def client(proxy: ProxyServer, key: tuple[str, str] = ALICE) -> httpx.Client:
    return httpx.Client(
        base_url=proxy.base_url, headers={"authorization": f"Bearer {key[0]}"}, timeout=10
    )


def create(c: httpx.Client, **extra: Any) -> dict[str, Any]:
    r = c.post(
        "/v1/responses", json={"model": "tiny", "input": "Hi", "max_output_tokens": 3, **extra}
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def create_spread(c: httpx.Client, count: int) -> list[dict[str, Any]]:
    """`count` responses made concurrently (each engine busy a while): least-outstanding
    balancing spreads them over both engines."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: create(c, fake={"first_byte_delay": 0.3}), range(count)))


def holder(engines: tuple[FakeVLLM, ...], client_id: str) -> FakeVLLM:
    """The engine whose store holds the response the client knows as `client_id`."""
    (found,) = [f for f in engines if f.responses.get(client_id.rpartition("-")[0]) is not None]
    return found


def test_every_id_leads_back_to_its_engine(
    proxy: ProxyServer, engines: tuple[FakeVLLM, FakeVLLM]
) -> None:
    a, b = engines
    with client(proxy) as c:
        made = create_spread(c, 6)
        assert a.requests_to("/v1/responses") and b.requests_to("/v1/responses")
        for response in made:
            assert response["id"].startswith("resp_")
            got = c.get(f"/v1/responses/{response['id']}")
            assert got.status_code == 200, got.text
            assert got.json()["id"] == response["id"]  # the client's name, not the engine's
            assert got.json()["output"] == response["output"]
    for fake in engines:
        made_here = {m["id"].rpartition("-")[0] for m in made if holder(engines, m["id"]) is fake}
        got_here = {
            r.route.rpartition("/")[2]
            for r in fake.seen.requests
            if r.route.startswith("/v1/responses/")
        }
        assert got_here == made_here  # each retrieval went where the response was made


def test_an_id_is_useless_with_another_key_or_edited(proxy: ProxyServer) -> None:
    with client(proxy) as alice, client(proxy, BOB) as bob:
        rid = create(alice)["id"]
        for c, asked in [
            (bob, rid),  # another owner: as if it did not exist
            (alice, rid[:-1] + ("0" if rid[-1] != "0" else "1")),  # the MAC does not verify
            (alice, rid.rpartition("-")[0]),  # the engine's own id, without our suffix
            (alice, "resp_" + "f" * 16 + "-" + "0" * 24),
        ]:
            r = c.get(f"/v1/responses/{asked}")
            assert r.status_code == 404, (asked, r.text)
            error = r.json()["error"]
            assert error["code"] == "response_not_found" and asked in error["message"]
            assert c.post(f"/v1/responses/{asked}/cancel").status_code == 404
            r = c.post(
                "/v1/responses",
                json={"model": "tiny", "input": "more", "previous_response_id": asked},
            )
            assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"


def test_previous_response_id_goes_to_the_engine_that_holds_it(
    proxy: ProxyServer, engines: tuple[FakeVLLM, FakeVLLM]
) -> None:
    _, b = engines
    with client(proxy) as c:
        first = create(c)
        held_by = holder(engines, first["id"])
        for _ in range(4):
            follow = create(c, previous_response_id=first["id"])
            assert follow["previous_response_id"] == first["id"]  # the name the client knows
        sent = held_by.requests_to("/v1/responses")
        assert len(sent) == 5  # all four follow-ups went to the holder
        engine_id = sent[0].body.get("previous_response_id")
        assert engine_id is None
        assert all(
            s.body["previous_response_id"] == first["id"].rpartition("-")[0] for s in sent[1:]
        )
        # Continued under another model of the same engine? Refused: it names the model.
        r = c.post(
            "/v1/responses",
            json={"model": "solo", "input": "x", "previous_response_id": first["id"]},
        )
        if held_by is b:
            assert r.status_code == 200
        else:
            assert r.status_code == 400 and "another model" in r.json()["error"]["message"]


def test_a_streamed_response_is_named_the_same_in_every_event(proxy: ProxyServer) -> None:
    with client(proxy) as c:
        r = c.post(
            "/v1/responses",
            json={"model": "tiny", "input": "Hi", "max_output_tokens": 3, "stream": True},
        )
        got = typed_events(r.content)
        ids = {data["response"]["id"] for _, data in got if "response" in data}
        (rid,) = ids
        assert rid.startswith("resp_") and "-" in rid
        stored = c.get(f"/v1/responses/{rid}")
        assert stored.status_code == 200 and stored.json()["id"] == rid


def test_cancel_reaches_the_engine_of_a_background_response(
    proxy: ProxyServer, engines: tuple[FakeVLLM, FakeVLLM]
) -> None:
    with client(proxy) as c:
        made = create(c, background=True, max_output_tokens=500, fake={"token_delay": 0.05})
        assert made["status"] in ("queued", "in_progress")
        r = c.post(f"/v1/responses/{made['id']}/cancel")
        assert r.status_code == 200, r.text
        assert (r.json()["id"], r.json()["status"]) == (made["id"], "cancelled")
        posts = [s for fake in engines for s in fake.seen.requests if s.route.endswith("/cancel")]
        assert len(posts) == 1 and made["id"].rpartition("-")[0] in posts[0].route


def test_an_engine_that_is_gone_is_a_clear_error_never_another_s_response(
    engines: tuple[FakeVLLM, FakeVLLM],
) -> None:
    a, b = engines
    with ProxyServer.from_dict(config(a, b)) as proxy, client(proxy) as c:
        made = create_spread(c, 4)
        on_a = {m["id"] for m in made if holder(engines, m["id"]) is a}
        assert 0 < len(on_a) < len(made)
        a.stop()
        for response in made:
            r = c.get(f"/v1/responses/{response['id']}")
            if response["id"] not in on_a:
                assert r.status_code == 200 and r.json()["id"] == response["id"]
                continue
            assert r.status_code in (502, 503), r.text
            assert r.json()["error"]["code"] in ("upstream_unreachable", "circuit_open")
    # b never saw a retrieval of a response it does not hold.
    b_made = len(b.requests_to("/v1/responses"))
    assert len([s for s in b.seen.requests if s.route.startswith("/v1/responses/")]) == b_made
    # Another proxy with the same secret, where that engine is no longer configured: 404.
    with (
        ProxyServer.from_dict(
            {**config(b, b), "models": {"tiny": {"upstreams": [b.base_url]}}}
        ) as other,
        client(other) as c,
    ):
        for response in made:
            status = c.get(f"/v1/responses/{response['id']}").status_code
            assert status == (404 if response["id"] in on_a else 200)


def test_a_proxy_with_the_same_secret_routes_ids_it_did_not_make(
    engines: tuple[FakeVLLM, FakeVLLM],
) -> None:
    with ProxyServer.from_dict(config(*engines)) as one, client(one) as c:
        rid = create(c)["id"]
    with ProxyServer.from_dict(config(*engines)) as two, client(two) as c:
        assert c.get(f"/v1/responses/{rid}").status_code == 200
    other_secret = config(*engines)
    other_secret["server"]["response_id_secret"] = "t" * 32
    with ProxyServer.from_dict(other_secret) as three, client(three) as c:
        assert c.get(f"/v1/responses/{rid}").status_code == 404


def _routes(*labels: str) -> dict[str, ModelRoute]:
    route = ModelRoute("tiny")
    for label in labels:
        route.add(Upstream(label, label, "tiny", None, None))  # type: ignore[arg-type]
    return {"tiny": route}


def test_ids_bind_engine_owner_and_secret() -> None:
    ids = ResponseIds(_routes("http://a", "http://b"), b"k" * 32)
    rid = ids.encode("resp_1", "http://a", "alice")
    assert ids.decode(rid, "alice") == ("resp_1", "http://a", ["tiny"])
    assert ids.decode(rid, "bob") is None
    assert ids.decode(rid.replace("resp_1", "resp_2"), "alice") is None
    assert ResponseIds(_routes("http://a"), b"j" * 32).decode(rid, "alice") is None
    assert ResponseIds(_routes("http://b"), b"k" * 32).decode(rid, "alice") is None
    for junk in ["", "-", "resp_1", "resp_1-", "resp_1-zz", "-" + rid.rpartition("-")[2]]:
        assert ids.decode(junk, "alice") is None
