"""A vgate deployment across hosts: a Redis host, proxy hosts, engine hosts and a client host.

Redis and `vgate serve` run as processes on their hosts; the fake engines run in this process,
on threads inside their hosts' namespaces, so the tests read what each engine recorded. The
client's requests are made on threads inside the client host: every byte crosses the switch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from engine.client import exposition
from tests.fakes.vllm import FakeVLLM
from tests.net.netns import Host, Network
from tests.proxy.helpers import CHAT_PATH

PROXY_PORT = 8080
ADMIN_PORT = 9090
ENGINE_PORT = 8000
REDIS_PORT = 6379
CONNECT_TIMEOUT = 0.5
IDLE_TIMEOUT = 1.0
ATTEMPT_TIMEOUT = 1.0
HEALTH_INTERVAL = 0.2
RESET_TIMEOUT = 3.0

# Short timeouts: every fault must show within a second or two. `attempt_timeout` bounds a
# request sent on a connection pooled before its host went silent (nothing else does, short of
# `first_byte_timeout`).
CONFIG = """
[server]
host = "{address}"
port = {port}
drain_timeout = 0.5

[upstream]
connect_timeout = {connect_timeout}
first_byte_timeout = 5.0
stream_idle_timeout = {idle_timeout}
health_interval = {health_interval}
metrics_interval = 0.5

[admin]
enabled = true
host = "127.0.0.1"
port = {admin_port}

[models.tiny]
upstreams = {upstreams}

[resilience]
affinity = "{affinity}"

[resilience.breaker]
fail_max = 2
reset_timeout = {reset_timeout}

[resilience.retry]
attempt_timeout = {attempt_timeout}

[policies]
order = ["auth", "ratelimit"]

[policies.auth]
keys = [
  {{ name = "load", sha256 = "{load_sha}" }},
  {{ name = "metered", sha256 = "{metered_sha}", limits = {{ requests_per_minute = {rpm} }} }},
]

[policies.ratelimit]
storage = "{redis}"
key_prefix = "{prefix}"
"""


@dataclass
class Keys:
    """API keys: `load` has no budget, `metered` has `rpm` requests per minute."""

    load: str
    load_sha: str
    metered: str
    metered_sha: str
    rpm: int = 5


@dataclass
class Proxy:
    """One `vgate serve` on its host."""

    host: Host
    affinity: str
    base_url: str = ""
    log: Path | None = None

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """The admin /metrics, scraped on the proxy's own host (its loopback, as documented)."""
        text = self.host.call(_get_text, f"http://127.0.0.1:{ADMIN_PORT}/metrics")
        return {(s.name, frozenset(s.labels.items())): s.value for s in exposition.parse(text)}

    def sample(self, name: str, upstream: str) -> float | None:
        return self.metrics().get((name, frozenset({("model", "tiny"), ("upstream", upstream)})))


@dataclass
class Cluster:
    network: Network
    redis: Host
    proxies: list[Proxy]
    engines: list[Host]
    client: Host
    fakes: list[FakeVLLM] = field(default_factory=list)

    @property
    def upstreams(self) -> list[str]:
        return [f"http://{e.address}:{ENGINE_PORT}" for e in self.engines]

    def config(self, proxy: Proxy, keys: Keys, prefix: str) -> str:
        return CONFIG.format(
            address=proxy.host.address,
            port=PROXY_PORT,
            admin_port=ADMIN_PORT,
            upstreams=orjson.dumps(self.upstreams).decode(),
            affinity=proxy.affinity,
            load_sha=keys.load_sha,
            metered_sha=keys.metered_sha,
            rpm=keys.rpm,
            redis=f"redis://{self.redis.address}:{REDIS_PORT}/0",
            prefix=prefix,
            connect_timeout=CONNECT_TIMEOUT,
            idle_timeout=IDLE_TIMEOUT,
            health_interval=HEALTH_INTERVAL,
            reset_timeout=RESET_TIMEOUT,
            attempt_timeout=ATTEMPT_TIMEOUT,
        )

    def states(self, proxy: Proxy) -> dict[str, dict[str, Any]]:
        """The proxy's /ready upstream states of model `tiny`, asked from the client host."""
        text = self.client.call(_get_text, f"{proxy.base_url}/ready", ok=(200, 503))
        states: dict[str, dict[str, Any]] = orjson.loads(text)["upstreams"]["tiny"]
        return states

    def wait_states(self, proxy: Proxy, within: float = 5.0, **want: Any) -> None:
        """`wait_state` for every upstream of `proxy`."""
        for upstream in self.upstreams:
            self.wait_state(proxy, upstream, within, **want)

    def wait_state(
        self, proxy: Proxy, upstream: str, within: float = 5.0, **want: Any
    ) -> dict[str, Any]:
        """Until `upstream` has the /ready fields `want` (e.g. healthy=True) on `proxy`."""
        deadline = time.monotonic() + within
        while True:
            state = self.states(proxy)[upstream]
            if all(state.get(k) == v for k, v in want.items()):
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"{upstream} on {proxy.host} is not {want}: {state}")
            time.sleep(0.05)


def _get_text(url: str, ok: tuple[int, ...] = (200,)) -> str:
    response = httpx.get(url, timeout=5.0)
    assert response.status_code in ok, (url, response.status_code, response.text)
    return response.text


# -- the client's side ------------------------------------------------------------------------


def chat_body(
    text: str = "Say hello", *, stream: bool = True, tokens: int = 4, **fake: Any
) -> dict[str, Any]:
    """A chat request; `fake` holds the fake engine's per-request faults and pacing."""
    body: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": tokens,
        "stream": stream,
    }
    if fake:
        body["fake"] = fake
    return body


@dataclass
class Answer:
    """What the client got: status, who served it, and for a stream how it ended."""

    status: int
    upstream: str | None  # x-vgate-upstream: "<upstream> <model>"
    body: Any = None  # a whole answer's JSON
    events: list[Any] = field(default_factory=list)  # a stream's data payloads, [DONE] left out
    done: bool = False  # the stream ended with [DONE]
    error: Any = None  # the stream's error event, or the transport error's name
    took: float = 0.0  # seconds, request to end
    ended_at: float = 0.0  # time.monotonic() when it ended


def post(base_url: str, key: str, body: dict[str, Any], timeout: float = 15.0) -> Answer:
    """One completion request (stream or not), read to its end; runs on the client host."""
    start = time.monotonic()
    headers = {"authorization": f"Bearer {key}"}
    answer = Answer(0, None)
    try:
        # Plain HTTP: verify=False skips loading the CA bundle (25 ms of CPU per client).
        with (
            httpx.Client(timeout=timeout, verify=False) as client,
            client.stream("POST", base_url + CHAT_PATH, json=body, headers=headers) as response,
        ):
            answer.status = response.status_code
            answer.upstream = response.headers.get("x-vgate-upstream")
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                _read_events(response, answer)
            else:
                answer.body = orjson.loads(response.read())
    except httpx.TransportError as exc:
        answer.error = type(exc).__name__
    answer.ended_at = time.monotonic()
    answer.took = answer.ended_at - start
    return answer


def _read_events(response: httpx.Response, answer: Answer) -> None:
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            answer.done = True
            continue
        event = orjson.loads(data)
        if "error" in event:
            answer.error = event["error"]
        else:
            answer.events.append(event)


def served_by(answer: Answer) -> str:
    """The upstream URL that served `answer`."""
    assert answer.upstream is not None, answer
    return answer.upstream.split(" ")[0]
