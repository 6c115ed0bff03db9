"""Reliability contract, scenario 41: a long soak against a fake SSE upstream -> RSS, open fds
and task count flat; error rate 0.

The fake (tests/fakes/vllm.py) and a real `vgate serve` run as processes of their own, as
bench/proxy_bench.py starts them: the proxy's /proc figures are then its own, not mixed with this
test's clients and the fake's sockets. The config keeps the shipped resilience defaults
(breaker, retries and their budget, backpressure), turns the admin listener on and the request
log off; the proxy is watched through its /metrics (`process_open_fds`,
`process_resident_memory_bytes`, `vgate_event_loop_tasks`).

Sixteen closed-loop clients send a fixed mix of requests: non-streaming and streaming chat and
completions, clients that leave mid-stream or while the first byte is slow, and engine faults
(a 5xx that a retry hides, a 5xx on every attempt, a reset mid-stream, an error event, a 4xx).
Ten clients reuse keep-alive connections, six open a new connection per request, and every
round starts with new clients. After a warm-up round and a quiet spell (idle keep-alive
connections closed by their timeouts) the baseline is sampled; after the soak rounds and the
same quiet spell, fds and tasks must be back at it and RSS must not have grown past a bound;
every request without an injected fault must have succeeded, and every faulted one must have
had its documented outcome.

Run with `-s` to see the figures. To see it fail, break the proxy in a copy of the tree (the
processes run the checkout the test file is in): with `WireResponse.aclose` a no-op, the
upstream connections of clients that left pile up (fds 119 -> 712 on the dev box).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from engine.client import exposition as prometheus
from tests.fakes.processes import service
from tests.proxy.helpers import CHAT_PATH, COMPLETIONS_PATH, chat, events

pytestmark = pytest.mark.slow

VGATE = Path(sys.executable).parent / "vgate"

CLIENTS = 16
NEW_CONNECTION_CLIENTS = 6  # of those, the ones that open a new connection for each request
WARMUP_SECONDS = 3.0
ROUNDS = 5
ROUND_SECONDS = 4.0
# The fake closes idle keep-alive connections after this (uvicorn, vLLM's server: 5 s), the
# proxy's pool stops reusing them a little earlier (upstream.keepalive_expiry, as in production).
# Short, so the quiet spells before the two samples take a couple of seconds.
UPSTREAM_KEEPALIVE = 2.0
FD_TOLERANCE = 2
TASK_TOLERANCE = 2
# A flat process still moves a little: pymalloc arenas and glibc's heap keep their high-water
# mark from the busiest moment (16 streams, 16 request bodies, httptools buffers), and the warm-up
# round does not reach every first-use allocation (label children, error paths, interned
# strings). On the dev box the growth was 1-2 MB per run, and a 30-round soak (35,000 requests)
# levelled off at +2.3 MB. The bound is for per-request leaks: the rounds make ~3,000 (a loaded
# machine) to ~6,500 requests, so keeping 2.5-5 KiB per request (a request's body and headers,
# its task, an SSE buffer, a connection object) crosses it.
RSS_GROWTH_BOUND = 15 * 2**20


# -- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@dataclass(frozen=True)
class Soak:
    base_url: str
    admin_url: str
    log: Path


@pytest.fixture
def soak(tmp_path: Path) -> Iterator[Soak]:
    fake_port, port, admin_port = free_port(), free_port(), free_port()
    config = tmp_path / "vgate.toml"
    # Nothing under [resilience]: the defaults are what the contract is about.
    config.write_text(
        f"""[server]
host = "127.0.0.1"
port = {port}
drain_timeout = 1.0

[upstream]
health_interval = 60.0
metrics_interval = 60.0
keepalive_expiry = {UPSTREAM_KEEPALIVE * 0.75}
# Twice the clients (the default is 1000): a connection slot that leaked with each abandoned
# stream would exhaust the pool within the soak, and the clean requests after it would fail.
max_connections = {2 * CLIENTS}

[models.tiny]
upstreams = ["http://127.0.0.1:{fake_port}"]

[admin]
enabled = true
port = {admin_port}

[logging]
requests = false
"""
    )
    fake_cmd = [sys.executable, "-m", "tests.fakes.vllm", "--port", str(fake_port)]
    fake_cmd += ["--keepalive-timeout", str(UPSTREAM_KEEPALIVE)]
    log = tmp_path / "vgate.log"
    with (
        service(fake_cmd, fake_port, tmp_path / "fake.log"),
        service([str(VGATE), "serve", "--config", str(config)], port, log),
    ):
        yield Soak(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", log)


# -- the workload ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What one client saw: status (None: it left before any), body so far, whether it left."""

    status: int | None
    body: bytes
    left: bool = False


UPSTREAM_400 = {"error": {"message": "soak: bad request", "type": "BadRequestError", "code": 400}}


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _error(data: Any) -> dict[str, Any]:
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, dict) else {}


def outcome(answer: Answer) -> str:
    """What happened, as one of the names the kinds expect; anything else describes itself."""
    got = events(answer.body)
    clean = not any(b'"error"' in e for e in got)
    if answer.left:
        if answer.status is None:
            return "left before the answer"
        if answer.status == 200 and len(got) >= 3 and clean:
            return "left mid-stream"
    elif answer.status == 200:
        if got and got[-1] == b"[DONE]":
            if clean:
                return "ok"
            if len(got) >= 2 and _error(_json(got[-2])).get("message") == "fake engine error":
                return "engine error event"
        elif got:
            if _error(_json(got[-1])).get("code") == "upstream_stream_broken":
                return "stream broken"
        elif isinstance(data := _json(answer.body), dict) and data.get("choices"):
            return "ok"
    elif answer.status == 502 and _error(_json(answer.body)).get("code") == "upstream_server_error":
        return "502 upstream_server_error"
    elif answer.status == 400 and _json(answer.body) == UPSTREAM_400:
        return "engine 400 passed through"
    return f"unexpected: status {answer.status}, left {answer.left}: {answer.body[-200:]!r}"


@dataclass(frozen=True)
class Kind:
    path: str
    body: dict[str, Any]
    expect: tuple[str, ...] = ("ok",)
    leave_after_events: int | None = None  # read this many events, then close the connection
    leave_after: float | None = None  # seconds: give up waiting for the answer, close

    @property
    def faulted(self) -> bool:
        return self.expect != ("ok",)


def _completion(tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "Once upon a time", "max_tokens": tokens, "stream": stream}


# A generation far longer than the test: if the proxy left its upstream connection open after
# the client went, the fake would still be streaming into it (an open fd) at the end.
_LONG = {"token_delay": 0.05}
# An engine that fails once, then answers: the retry hides it, unless the shared retry budget
# (proxy/retry.py: 0.2 of a retry per request, ~3 banked at most) happens to be empty, when the
# documented answer is the 502. In this mix it refills far faster than the faults spend it.
_FAIL_ONCE = {"fail_first": 1, "fail_with": {"status": 503}}
_RETRIED = ("ok", "502 upstream_server_error")
KINDS = {
    "chat": Kind(CHAT_PATH, chat(12, False)),
    "stream": Kind(CHAT_PATH, chat(24, True)),
    "completion": Kind(COMPLETIONS_PATH, _completion(12, False)),
    "completion_stream": Kind(COMPLETIONS_PATH, _completion(24, True)),
    "stream_paced": Kind(CHAT_PATH, chat(16, True, fake={"token_delay": 0.003})),
    "stream_slow_start": Kind(CHAT_PATH, chat(8, True, fake={"first_event_delay": 0.1})),
    # Faults on the client's side: it leaves mid-stream, or while the first byte is slow.
    "leave_mid_stream": Kind(
        CHAT_PATH, chat(1000, True, fake=_LONG), ("left mid-stream",), leave_after_events=3
    ),
    "leave_slow_first_event": Kind(
        CHAT_PATH,
        chat(8, True, fake={"first_event_delay": 60}),
        ("left before the answer",),
        leave_after=0.15,
    ),
    "leave_slow_answer": Kind(
        CHAT_PATH,
        chat(8, False, fake={"first_byte_delay": 60}),
        ("left before the answer",),
        leave_after=0.15,
    ),
    # Faults on the engine's side.
    "retried_5xx": Kind(CHAT_PATH, chat(12, False, fake=_FAIL_ONCE), _RETRIED),
    "retried_5xx_stream": Kind(CHAT_PATH, chat(12, True, fake=_FAIL_ONCE), _RETRIED),
    "server_error": Kind(
        CHAT_PATH,
        chat(12, False, fake={"status": 500, "body": "boom"}),
        ("502 upstream_server_error",),
    ),
    "reset_mid_stream": Kind(
        CHAT_PATH, chat(24, True, fake={"reset_after_events": 3}), ("stream broken",)
    ),
    "error_event": Kind(
        CHAT_PATH, chat(24, True, fake={"error_event_after": 3}), ("engine error event",)
    ),
    "engine_400": Kind(
        CHAT_PATH,
        chat(12, False, fake={"status": 400, "body": UPSTREAM_400}),
        ("engine 400 passed through",),
    ),
}
# A client's cycle; each starts at another offset, so the faults are spread over time.
SCHEDULE = (
    "chat", "stream", "completion", "stream_paced", "leave_mid_stream", "chat", "stream",
    "error_event", "completion_stream", "chat", "stream_slow_start", "stream",
    "leave_slow_first_event", "engine_400", "stream_paced", "chat", "stream", "completion",
    "stream", "leave_slow_answer", "chat", "stream", "completion_stream", "stream_paced",
)  # fmt: skip
# The faults the breaker counts (each 5xx attempt, a reset mid-stream) come from one client
# only, each followed by a clean request: at most 3 failures in a row (one request's three
# attempts), below the default fail_max of 5, however the other clients' requests interleave.
# Spread over all clients they could line up 5 in a row, and the breaker would rightly open
# and fail the clean requests: another scenario (and a flaky soak).
FAULT_CLIENT = CLIENTS - 1
FAULT_SCHEDULE = (
    "server_error", "chat", "retried_5xx", "stream", "reset_mid_stream", "chat",
    "retried_5xx_stream", "stream",
)  # fmt: skip


@dataclass
class Tally:
    seen: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, outcome)
    problems: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def of(self, kind: str) -> Counter[str]:
        return Counter({o: n for (k, o), n in self.seen.items() if k == kind})


async def one(client: httpx.AsyncClient, kind: Kind, rid: str) -> Answer:
    headers = {"x-request-id": rid}
    content = orjson.dumps(kind.body)
    if kind.leave_after is not None:
        try:
            async with asyncio.timeout(kind.leave_after):
                r = await client.post(kind.path, content=content, headers=headers)
        except TimeoutError:
            return Answer(None, b"", left=True)
        return Answer(r.status_code, r.content)
    async with client.stream("POST", kind.path, content=content, headers=headers) as r:
        body = b""
        async for chunk in r.aiter_raw():
            body += chunk
            leave = kind.leave_after_events
            if leave is not None and body.count(b"\n\n") >= leave:
                # Leaving the block unread closes the connection: the client is gone.
                return Answer(r.status_code, body, left=True)
        return Answer(r.status_code, body)


async def client_loop(
    base_url: str, index: int, new_connections: bool, until: float, tally: Tally, ids: Iterator[int]
) -> None:
    """One closed-loop client: its next request as soon as the last one ended."""
    headers = {"connection": "close"} if new_connections else {}
    cycle = FAULT_SCHEDULE if index == FAULT_CLIENT else SCHEDULE
    schedule = itertools.islice(itertools.cycle(cycle), index * 5 % len(cycle), None)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=15.0) as client:
        for name in schedule:
            if time.monotonic() >= until:
                return
            kind = KINDS[name]
            rid = f"soak-{next(ids)}"
            try:
                got = outcome(await one(client, kind, rid))
            except httpx.HTTPError as exc:
                got = f"unexpected: {type(exc).__name__}: {exc}"
            if got not in kind.expect:
                tally.problems.append(f"{name} {rid}: {got}")
                got = "unexpected"
            tally.seen[name, got] += 1


async def run_round(
    base_url: str, number: int, seconds: float, tally: Tally, ids: Iterator[int]
) -> None:
    until = time.monotonic() + seconds

    def new_connections(index: int) -> bool:
        # The fault client takes turns: kept-alive connections one round, new ones the next.
        return index < NEW_CONNECTION_CLIENTS or (index == FAULT_CLIENT and number % 2 == 1)

    await asyncio.gather(
        *(client_loop(base_url, i, new_connections(i), until, tally, ids) for i in range(CLIENTS))
    )


# -- what the proxy reports -----------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    fds: float
    rss: float
    tasks: float

    def __str__(self) -> str:
        return f"{self.fds:.0f} fds, {self.tasks:.0f} tasks, RSS {self.rss / 2**20:.1f} MB"


async def scrape(admin_url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        r = await client.get(admin_url + "/metrics")
    r.raise_for_status()
    samples: dict[str, float] = {}
    for s in prometheus.parse(r.text):
        key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()))
        samples[key] = s.value
    return samples


async def figures(admin_url: str) -> Figures:
    s = await scrape(admin_url)
    return Figures(
        s["process_open_fds"], s["process_resident_memory_bytes"], s["vgate_event_loop_tasks"]
    )


async def quiet(admin_url: str, done: Callable[[Figures], bool] | None = None) -> Figures:
    """Figures once idle connections are gone: the clients closed theirs, the fake closes the
    proxy's pooled ones after UPSTREAM_KEEPALIVE. With `done`: as soon as it holds (bounded)."""
    if done is None:
        await asyncio.sleep(UPSTREAM_KEEPALIVE + 0.5)
        return await figures(admin_url)
    deadline = time.monotonic() + UPSTREAM_KEEPALIVE + 3.0
    while True:
        now = await figures(admin_url)
        if done(now) or time.monotonic() >= deadline:
            return now
        await asyncio.sleep(0.2)


async def test_soak_keeps_fds_tasks_and_memory_flat_with_no_errors(soak: Soak) -> None:
    started = time.monotonic()
    ids = itertools.count()
    warmup = Tally()
    await run_round(soak.base_url, 0, WARMUP_SECONDS, warmup, ids)
    baseline = await quiet(soak.admin_url)

    tally = Tally()
    under_load: list[Figures] = []
    for number in range(1, ROUNDS + 1):
        # New clients each round: new connections as well as kept-alive ones within a round.
        load = asyncio.create_task(run_round(soak.base_url, number, ROUND_SECONDS, tally, ids))
        await asyncio.sleep(ROUND_SECONDS / 2)
        under_load.append(await figures(soak.admin_url))
        await load

    def back(f: Figures) -> bool:
        return f.fds <= baseline.fds + FD_TOLERANCE and f.tasks <= baseline.tasks + TASK_TOLERANCE

    end = await quiet(soak.admin_url, back)
    samples = await scrape(soak.admin_url)
    seconds = time.monotonic() - started
    kinds = "\n".join(f"    {name}: {dict(tally.of(name))}" for name in KINDS)
    clean = sum(tally.of(name).total() for name, kind in KINDS.items() if not kind.faulted)
    report = (
        f"soak: {tally.total} requests ({clean} without a fault) in {ROUNDS} rounds of "
        f"{ROUND_SECONDS:g} s after a warm-up of {warmup.total}; {seconds:.1f} s in all\n"
        f"  baseline: {baseline}\n  mid-round: "
        + "; ".join(str(f) for f in under_load)
        + f"\n  end: {end}\n  outcomes by kind:\n{kinds}"
    )
    print(report)

    # Error rate 0: clean requests all succeeded, faulted ones all had an expected outcome.
    problems = warmup.problems + tally.problems
    assert not problems, f"{len(problems)} failed:\n" + "\n".join(problems[:20]) + f"\n{report}"
    assert all(tally.of(name) for name in KINDS), report  # every kind ran in the soak rounds
    for name in ("retried_5xx", "retried_5xx_stream"):
        # The retry hid most of them (the rest met an empty retry budget, as designed).
        assert tally.of(name)["ok"] > tally.of(name).total() / 2, report
    assert not [k for k in samples if "outcome=server_error" in k], report  # no vgate bug (500)
    trips = [v for k, v in samples.items() if k.startswith("vgate_upstream_breaker_trips_total")]
    assert trips == [0], report
    # Nothing is left counted as in flight: the request and the upstream slot were released.
    in_flight = [
        v
        for k, v in samples.items()
        if k.startswith(("vgate_requests_in_flight", "vgate_upstream_in_flight"))
    ]
    assert in_flight == [0, 0], (in_flight, report)

    # Flat: no leaked sockets (client or upstream), no leaked tasks, no memory growth.
    log_tail = soak.log.read_text()[-3000:]
    assert end.fds <= baseline.fds + FD_TOLERANCE, f"{report}\n{log_tail}"
    assert end.tasks <= baseline.tasks + TASK_TOLERANCE, f"{report}\n{log_tail}"
    assert end.rss - baseline.rss < RSS_GROWTH_BOUND, report
