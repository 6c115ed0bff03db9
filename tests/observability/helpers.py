"""Reading what the proxy exposes: its admin /metrics as samples, its log lines as JSON."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson

from engine.client import exposition as prometheus
from tests.fakes.harness import ProxyServer

Labels = frozenset[tuple[str, str]]


def admin_url(server: ProxyServer) -> str:
    admin = server.app.state.admin
    assert admin is not None, "the admin listener is not enabled in this config"
    return f"http://127.0.0.1:{admin.port}"


def scrape(server: ProxyServer) -> dict[tuple[str, Labels], float]:
    """Every sample of the admin /metrics, keyed by (name, labels)."""
    response = httpx.get(admin_url(server) + "/metrics", timeout=5.0)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value for s in prometheus.parse(response.text)}


def exposed(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Family names of a /metrics text (its # TYPE lines) and the label names on their samples
    (a histogram's `_bucket`, `_sum` and `_count` samples count as its own)."""
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line.startswith("#") and "{" in line:
            name, _, rest = line.partition("{")
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            labels.setdefault(base if base in names else name, set()).update(
                re.findall(r'(\w+)="', rest)
            )
    return names, labels


def value(samples: dict[tuple[str, Labels], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def family(samples: dict[tuple[str, Labels], float], name: str) -> dict[Labels, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def wait_for(server: ProxyServer, name: str, within: float = 5.0, **labels: str) -> float:
    """Scrape until the sample exists (the proxy records cancellations asynchronously)."""
    deadline = time.monotonic() + within
    while True:
        found = value(scrape(server), name, **labels)
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"no sample {name}{labels}")
        time.sleep(0.02)


class LineCapture(logging.Handler):
    """Formats records with the formatter the proxy's config installed, keeps the lines."""

    def __init__(self, formatter: logging.Formatter | None) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def json(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.lines]


@contextmanager
def capture_logs(names: tuple[str, ...] = ("vgate", "uvicorn")) -> Iterator[LineCapture]:
    """Lines of the given loggers as the configured handler would write them to stderr."""
    configured = logging.getLogger("vgate").handlers
    assert configured, "the proxy's logging config was not applied"
    capture = LineCapture(configured[0].formatter)
    loggers = [logging.getLogger(n) for n in names]
    for lg in loggers:
        lg.addHandler(capture)
    try:
        yield capture
    finally:
        for lg in loggers:
            lg.removeHandler(capture)
