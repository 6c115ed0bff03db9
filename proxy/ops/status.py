"""What `vgate status` shows: one look at a running proxy, from what it already serves.

The public `GET /ready` gives each model's readiness and each upstream's health, breaker, load
and KV-cache use; the admin listener's `GET /metrics` adds the engines' own queues and context
windows, the models' queues, and the last minute's requests and times to first token, which
the proxy keeps itself (`proxy.telemetry.window`): a single scrape has no rates. So the command
works against any running proxy, `vgate serve` or the appliance under systemd, and needs
nothing but the config file that says where the listeners are. With the admin listener off,
the /ready figures are shown and the rest is left blank, saying why.

Nothing here prints: `collect` returns a `Status` (or raises `Unreachable`); `proxy.cli.status`
renders it.
"""

from __future__ import annotations

import http.client
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from engine import launch
from engine.client import exposition as prometheus
from proxy.core.config import Config

TIMEOUT = 3.0


class Unreachable(Exception):
    """The proxy's /ready did not answer as vgate's does; `url` and a short `reason`."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class Endpoints:
    """Where a config's proxy listens, as a client on this host reaches it."""

    ready: str
    metrics: str | None  # None: not known, `no_metrics` says why
    engines: dict[str, str]  # [engines.NAME] -> its base URL
    no_metrics: str | None = None

    @classmethod
    def of(cls, cfg: Config) -> Endpoints:
        admin, metrics, why = cfg.admin, None, None
        if not admin.enabled:
            why = "the admin listener is off ([admin] enabled = false)"
        elif admin.port == 0:
            why = "admin.port = 0: the port it bound is only in the proxy's log"
        else:
            metrics = _http(admin.host, admin.port) + "/metrics"
        engines = {name: launch.base_url(e) for name, e in cfg.engines.items()}
        return cls(_http(cfg.server.host, cfg.server.port) + "/ready", metrics, engines, why)


@dataclass
class UpstreamState:
    upstream: str  # as configured: "engine:NAME" or the URL
    healthy: bool | None  # None: not probed yet
    error: str | None  # why the last health round failed ("warming up: ..." while warming)
    warmed_up: bool | None  # None: no warm-up for this upstream
    breaker: str  # closed | open | half-open
    breaker_retry_in: float
    in_flight: int

    @property
    def ok(self) -> bool:
        return bool(self.healthy) and self.breaker == "closed"

    @property
    def health(self) -> str:
        if self.healthy:
            return "healthy"
        if self.healthy is None:
            return "not probed"
        return "warming up" if (self.error or "").startswith("warming up") else "unhealthy"


@dataclass
class ModelState:
    name: str
    ready: bool
    problem: str | None  # /ready's reason when not ready
    in_flight: int  # at its upstreams
    queued: int  # waiting for an upstream slot
    requests: int | None = None  # finished within the window (None: no admin listener)
    requests_per_second: float | None = None
    ttft_p50: float | None = None  # seconds, streams finished within the window
    ttft_p95: float | None = None
    upstreams: list[UpstreamState] = field(default_factory=list)


@dataclass
class EngineState:
    engine: str  # [engines.NAME], or the URL of an upstream vgate does not launch
    upstream: str  # how models name it: "engine:NAME" or the URL
    url: str
    models: list[str]
    kv_cache_usage: float | None = None  # 0..1, as the engine's /metrics reports it
    running: int | None = None
    waiting: int | None = None
    max_model_len: int | None = None


@dataclass
class Status:
    proxy: str  # the /ready URL asked
    admin: str | None  # the /metrics URL asked (None: not known, `admin_error` says why)
    time: float  # seconds since the epoch
    ready: bool  # /ready's verdict: every model can be served
    window_seconds: float | None = None  # what `requests_per_second` and TTFT cover
    admin_error: str | None = None  # why there are no metrics (off, or did not answer)
    models: list[ModelState] = field(default_factory=list)
    engines: list[EngineState] = field(default_factory=list)

    @property
    def state(self) -> str:
        """ready: everything is; degraded: every model is served but some upstream is not
        healthy with a closed breaker; not ready: some model cannot be served."""
        if not self.ready:
            return "not ready"
        if all(u.ok for m in self.models for u in m.upstreams):
            return "ready"
        return "degraded"

    def exit_code(self) -> int:
        """0 when everything is ready, 1 when something is not."""
        return 0 if self.state == "ready" else 1

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, **asdict(self)}


def collect(ep: Endpoints, timeout: float = TIMEOUT) -> Status:
    """Ask the proxy once: /ready, then /metrics. Raises Unreachable when /ready does not
    answer as vgate does; a silent admin listener is only noted (`admin_error`)."""
    ready = _ready(ep.ready, timeout)
    status = Status(ep.ready, ep.metrics, time.time(), ready.get("status") == "ready")
    status.admin_error = ep.no_metrics
    problems = ready.get("models") or {}
    for name, upstreams in (ready.get("upstreams") or {}).items():
        ups = [_upstream(label, state) for label, state in upstreams.items()]
        queued = max((int(s.get("queued") or 0) for s in upstreams.values()), default=0)
        status.models.append(
            ModelState(
                name,
                ready=name not in problems,
                problem=problems.get(name),
                in_flight=sum(u.in_flight for u in ups),
                queued=queued,
                upstreams=ups,
            )
        )
    status.engines = _engines(ep, status.models, ready.get("upstreams") or {})
    if ep.metrics is not None:
        try:
            code, body = get(ep.metrics, timeout)
            if code != 200:
                raise Unreachable(ep.metrics, f"answered {code}")
            _add_metrics(status, body.decode())
        except Unreachable as exc:
            status.admin_error = str(exc)
        except (ValueError, UnicodeDecodeError) as exc:
            status.admin_error = f"{ep.metrics}: unreadable: {exc}"
    return status


def get(url: str, timeout: float = TIMEOUT) -> tuple[int, bytes]:
    """GET `url` over plain HTTP; Unreachable with a short reason when nothing answers."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    conn = http.client.HTTPConnection(host, parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/", headers={"Accept": "*/*"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    except ConnectionRefusedError:
        raise Unreachable(url, "connection refused") from None
    except TimeoutError:
        raise Unreachable(url, f"no answer within {timeout:g} s") from None
    except socket.gaierror:
        raise Unreachable(url, f"cannot resolve {host}") from None
    except OSError as exc:
        raise Unreachable(url, (exc.strerror or str(exc)).lower()) from None
    except http.client.HTTPException as exc:
        raise Unreachable(url, f"not an HTTP answer ({type(exc).__name__})") from None
    finally:
        conn.close()


def _ready(url: str, timeout: float) -> dict[str, Any]:
    code, body = get(url, timeout)
    try:
        data = orjson.loads(body) if code in (200, 503) else None
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("upstreams"), dict):
        raise Unreachable(url, f"answered {code}, not as vgate's /ready does")
    return data


def _upstream(label: str, s: dict[str, Any]) -> UpstreamState:
    return UpstreamState(
        upstream=label,
        healthy=s.get("healthy"),
        error=s.get("error"),
        warmed_up=s.get("warmed_up"),
        breaker=str(s.get("breaker", "?")),
        breaker_retry_in=float(s.get("breaker_retry_in") or 0.0),
        in_flight=int(s.get("in_flight") or 0),
    )


def _engines(
    ep: Endpoints, models: list[ModelState], ready: dict[str, dict[str, Any]]
) -> list[EngineState]:
    """The configured engines, then every other upstream URL: the engines the proxy talks to."""
    engines = {
        f"engine:{name}": EngineState(name, f"engine:{name}", url, [])
        for name, url in ep.engines.items()
    }
    for model in models:
        for u in model.upstreams:
            label = u.upstream
            engine = engines.setdefault(label, EngineState(label, label, label, []))
            engine.models.append(model.name)
            kv = ready[model.name][u.upstream].get("kv_cache_usage")
            if isinstance(kv, int | float):
                engine.kv_cache_usage = float(kv)
    return list(engines.values())


def _add_metrics(status: Status, text: str) -> None:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {
        (s.name, frozenset(s.labels.items())): s.value for s in prometheus.parse(text)
    }

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, frozenset(labels.items())))

    window = value("vgate_recent_window_seconds")
    status.window_seconds = window
    for model in status.models:
        queued = value("vgate_queue_depth", model=model.name)
        if queued is not None:
            model.queued = int(queued)
        count = value("vgate_recent_requests", model=model.name)
        if window is not None:
            model.requests = int(count or 0)
            model.requests_per_second = model.requests / window if window > 0 else None
        model.ttft_p50 = value("vgate_recent_ttft_seconds", model=model.name, quantile="0.5")
        model.ttft_p95 = value("vgate_recent_ttft_seconds", model=model.name, quantile="0.95")
    engines = {e.upstream: e for e in status.engines}
    for model in status.models:
        for u in model.upstreams:
            engine = engines.get(u.upstream)
            if engine is None:
                continue
            key = {"model": model.name, "upstream": u.upstream}
            for attr, name in (
                ("running", "vgate_engine_requests_running"),
                ("waiting", "vgate_engine_requests_waiting"),
                ("max_model_len", "vgate_engine_max_model_len"),
            ):
                found = value(name, **key)
                if found is not None and found == found:  # NaN: the engine did not say
                    setattr(engine, attr, int(found))


def _http(host: str, port: int) -> str:
    # A wildcard bind is reached on loopback, as `vgate up` reaches it.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
