"""The Grafana dashboard only queries metrics (and labels) the proxy really exposes."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import orjson

from tests.fakes.harness import ProxyServer, proxy_config
from tests.fakes.vllm import FakeVLLM
from tests.observability.helpers import admin_url, exposed
from tests.observability.test_alerts import SUPERVISOR_SERIES

DASHBOARD = Path(__file__).resolve().parents[2] / "systemd" / "grafana-dashboard.json"
_METRIC = re.compile(r"\b(?:vgate|process)_[a-z_]+")
_BY = re.compile(r"by \(([^)]*)\)")
_LEGEND = re.compile(r"\{\{(\w+)\}\}")
# Labels the queries may use beyond the families' own: histograms' bucket bound.
_BUILTIN = {"le"}


def _exposed(fake: FakeVLLM) -> tuple[set[str], dict[str, set[str]]]:
    """Family names and label names of a proxy's /metrics after one streamed request."""
    config = proxy_config(fake.base_url, admin={"enabled": True, "port": 0})
    with ProxyServer.from_dict(config) as server:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=10)
        return exposed(httpx.get(admin_url(server) + "/metrics", timeout=5).text)


def test_dashboard_queries_exposed_metrics(fake: FakeVLLM) -> None:
    dashboard = orjson.loads(DASHBOARD.read_bytes())
    names, labels = _exposed(fake)
    names |= set(SUPERVISOR_SERIES)  # a box of workers' (tests/proxy/test_workers.py)
    exprs = [
        (t["expr"], t.get("legendFormat", ""))
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    ]
    assert len(exprs) > 20
    for expr, legend in exprs:
        used = {re.sub(r"_(bucket|sum|count)$", "", m) for m in _METRIC.findall(expr)}
        assert used and used <= names, (expr, used - names)
        known = set().union(*(labels.get(m, set()) for m in used)) | _BUILTIN
        grouped = {g.strip() for by in _BY.findall(expr) for g in by.split(",")}
        # Families without samples yet have no known labels: checked where samples exist.
        if all(m in labels for m in used):
            assert grouped <= known, (expr, grouped - known)
            assert set(_LEGEND.findall(legend)) <= known | grouped, (expr, legend)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "model"}


def test_panels_are_grafana_panels_laid_out_without_overlap() -> None:
    panels = orjson.loads(DASHBOARD.read_bytes())["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        assert p["type"] in {"row", "stat", "timeseries"}, (p["title"], p["type"])
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
