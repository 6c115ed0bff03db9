"""Warm-up before ready: an engine vgate launches counts as ready only once it has answered one
real short request that vgate sent. Over real sockets, with the fake engine standing in for the
engine (at the address its `[engines.NAME]` table names), then once against real vLLM."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import launch
from engine.client.warmup import Warmup, attempts, problem
from proxy.cli.systemd import warm_up
from proxy.core.config import EngineConfig
from tests.fakes.harness import ProxyServer
from tests.fakes.processes import service
from tests.fakes.vllm import FakeVLLM
from tests.vllm_fixtures import VllmServer, free_port

WARMUP = "/v1/completions"


def engine_config(fake: FakeVLLM, **engine: Any) -> dict[str, Any]:
    return {
        "server": {"drain_timeout": 1.0},
        "upstream": {"health_interval": 0.2, "metrics_interval": 30.0},
        "models": {"tiny": {"upstreams": ["engine:tiny"]}},
        "engines": {
            "tiny": {"model": "/m", "build": "cpu", "port": fake.port, "served_name": "tiny"}
            | engine
        },
    }


def warmups(fake: FakeVLLM, path: str = WARMUP) -> list[Any]:
    return [s.body for s in fake.requests_to(path) if "x-request-id" not in s.headers]


def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def ready(server: ProxyServer) -> httpx.Response:
    return httpx.get(server.base_url + "/ready", timeout=5)


@pytest.fixture
def engine() -> Iterator[FakeVLLM]:
    with FakeVLLM() as fake:
        yield fake


def test_ready_only_after_the_warm_up_generation_was_answered(engine: FakeVLLM) -> None:
    # The first generation is slow, as on a cold engine: /ready waits for it.
    engine.defaults = {"first_byte_delay": 1.5}
    data = engine_config(engine, warmup_prompt="Warm up", warmup_tokens=5)
    with ProxyServer.from_dict(data) as server:
        r = ready(server)
        assert r.status_code == 503
        assert "warming up" in r.json()["models"]["tiny"]
        state = r.json()["upstreams"]["tiny"]["engine:tiny"]
        assert state["warmed_up"] is False
        until(lambda: ready(server).status_code == 200)
        (sent,) = warmups(engine)
        assert sent == {
            "model": "tiny",
            "prompt": "Warm up",
            "max_tokens": 5,
            "ignore_eos": True,
            "temperature": 0.0,
        }
        assert ready(server).json()["upstreams"]["tiny"]["engine:tiny"]["warmed_up"] is True
        # Warm once: later health rounds send no more.
        time.sleep(0.6)
        assert len(warmups(engine)) == 1


def test_a_failing_warm_up_keeps_the_engine_out_and_is_retried(engine: FakeVLLM) -> None:
    engine.defaults = {"status": 500, "body": "cold"}
    with ProxyServer.from_dict(engine_config(engine)) as server:
        until(lambda: len(warmups(engine)) >= 2)  # retried at each health round
        r = ready(server)
        assert r.status_code == 503
        assert "warming up: /v1/completions answered 500" in r.json()["models"]["tiny"]
        engine.defaults = {}
        until(lambda: ready(server).status_code == 200)


def test_a_restarted_engine_is_warmed_up_again(engine: FakeVLLM) -> None:
    with ProxyServer.from_dict(engine_config(engine)) as server:
        until(lambda: ready(server).status_code == 200)
        port = engine.port
        engine.stop()
        until(lambda: ready(server).status_code == 503)
        with FakeVLLM(port=port) as again:
            until(lambda: ready(server).status_code == 200)
            assert len(warmups(again)) == 1


def test_warmup_off_and_url_upstreams_send_nothing(engine: FakeVLLM) -> None:
    with ProxyServer.from_dict(engine_config(engine, warmup=False)) as server:
        until(lambda: ready(server).status_code == 200)
        assert ready(server).json()["upstreams"]["tiny"]["engine:tiny"]["warmed_up"] is None
    data = engine_config(engine)
    data["models"]["tiny"]["upstreams"] = [engine.base_url]  # someone else's engine
    with ProxyServer.from_dict(data) as server:
        until(lambda: ready(server).status_code == 200)
    assert warmups(engine) == []


def test_a_pooling_engine_is_warmed_up_with_an_embedding() -> None:
    with FakeVLLM(runner="pooling") as pooling:
        # Declared a pooling engine: an embedding straight away.
        data = engine_config(pooling, runner="pooling", convert="embed")
        with ProxyServer.from_dict(data) as server:
            until(lambda: ready(server).status_code == 200)
        assert warmups(pooling, WARMUP) == []
        assert warmups(pooling, "/v1/embeddings") == [{"model": "tiny", "input": "Hello"}]
        # Not declared (vLLM's runner "auto" found an embedding model): the generation's 404
        # moves the warm-up on to an embedding.
        pooling.reset()
        with ProxyServer.from_dict(engine_config(pooling)) as server:
            until(lambda: ready(server).status_code == 200)
        assert len(warmups(pooling, WARMUP)) == 1
        assert len(warmups(pooling, "/v1/embeddings")) == 1


def test_a_reload_keeps_a_warm_engine_warm(engine: FakeVLLM, tmp_path: Path) -> None:
    port = free_port()
    data = engine_config(engine)
    path = tmp_path / "vgate.toml"

    def write(models: str) -> None:
        path.write_text(
            f"""[server]
port = {port}
drain_timeout = 1.0
[upstream]
health_interval = 0.2
[models.tiny]
upstreams = ["engine:tiny"]
{models}
[engines.tiny]
model = "/m"
build = "cpu"
port = {data["engines"]["tiny"]["port"]}
"""
        )

    write("")
    args = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(path)]
    log = tmp_path / "proxy.log"
    with service(args, port, log) as proc:
        base = f"http://127.0.0.1:{port}"
        until(lambda: httpx.get(base + "/ready").status_code == 200)
        write('[models.alias]\nupstreams = ["engine:tiny"]\nserved_name = "tiny"\n')
        os.kill(proc.pid, signal.SIGHUP)
        until(lambda: "reload applied" in log.read_text())
        assert httpx.get(base + "/ready").status_code == 200
        models = [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]]
        assert models == ["tiny", "alias"]
    assert len(warmups(engine)) == 1
    assert "warmed up in" in log.read_text()  # the journal says when


def test_the_warm_up_requests_and_their_checks() -> None:
    generate = Warmup(prompt="p", max_tokens=3)
    (first, then) = attempts(generate, "m")
    assert first[0] == "/v1/completions" and then[0] == "/v1/embeddings"
    ok = b'{"choices":[{"text":"abc"}],"usage":{"completion_tokens":3}}'
    assert problem(generate, "/v1/completions", 200, ok) is None
    short = b'{"usage":{"completion_tokens":1}}'
    assert "generated 1 tokens, not 3" in str(problem(generate, "/v1/completions", 200, short))
    assert "not JSON" in str(problem(generate, "/v1/completions", 200, b"<html>"))
    assert problem(generate, "/v1/embeddings", 200, b'{"data":[{"embedding":[0.1]}]}') is None
    assert attempts(Warmup(kind="classify"), "m")[0][0] == "/classify"
    cfg = EngineConfig(model="/m", runner="pooling", convert="classify")
    assert launch.warmup_of(cfg) == Warmup(kind="classify")
    assert launch.warmup_of(EngineConfig(model="/m", warmup=False)) is None


def test_the_engine_unit_s_readiness_warms_up_too(engine: FakeVLLM) -> None:
    # What `vgate systemd wait-healthy` runs after /health answers (ExecStartPost).
    health = engine.base_url + "/health"
    deadline = time.monotonic() + 10
    assert warm_up(health, Warmup(max_tokens=4), "tiny", "sekrit", deadline) is None
    (seen,) = engine.requests_to(WARMUP)
    assert seen.headers["authorization"] == "Bearer sekrit"
    assert seen.body["max_tokens"] == 4
    engine.defaults = {"status": 503, "body": "loading"}
    assert "answered 503" in str(warm_up(health, Warmup(), "tiny", None, deadline))


@pytest.mark.vllm
def test_real_vllm_shows_the_warm_up_before_ready(vllm_server: VllmServer, tmp_path: Path) -> None:
    from engine.client import exposition

    def served() -> float:
        text = httpx.get(vllm_server.base_url + "/metrics", timeout=10).text
        return sum(exposition.values(exposition.parse(text), "vllm:generation_tokens_total"))

    before = served()
    port = int(vllm_server.base_url.rsplit(":", 1)[1])
    data = {
        "server": {"drain_timeout": 1.0},
        "upstream": {"health_interval": 0.5, "metrics_interval": 30.0},
        "models": {"tiny": {"upstreams": ["engine:tiny"]}},
        "engines": {"tiny": {"model": "/m", "build": "cpu", "port": port, "warmup_tokens": 6}},
    }
    with ProxyServer.from_dict(data) as server:
        until(lambda: ready(server).status_code == 200, within=120)
        # The engine's own counters show the 6 tokens vgate had it generate.
        assert served() - before >= 6
