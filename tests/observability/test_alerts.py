"""The alerting rules (systemd/prometheus-alerts.yml): promtool accepts them and passes their unit
tests (tests/observability/alerts/), they query only metrics and labels a real proxy exposes,
and the dashboard draws the same thresholds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from proxy.telemetry.metrics import BREAKER_STATES, OUTCOMES, TTFT_BUCKETS
from tests.fakes.harness import ProxyServer, proxy_config
from tests.fakes.vllm import FakeVLLM
from tests.observability.helpers import admin_url, exposed

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "systemd" / "prometheus-alerts.yml"
DASHBOARD = ROOT / "systemd" / "grafana-dashboard.json"
RULE_TESTS = sorted((Path(__file__).parent / "alerts").glob("*.test.yml"))

# Alerts on a state (down, unhealthy, absent) rather than a level: no threshold to draw.
STATE_ALERTS = {
    "VgateUpstreamUnhealthy",
    "VgateModelNotReady",
    "VgateProxyDown",
    "VgateMetricsAbsent",
}
# Series Prometheus makes itself, and the labels it adds to every scraped series.
PROMETHEUS_SERIES = {"up"}
# The supervisor's own series (only with `[server] workers` above 1): tests/proxy/test_workers.py
# scrapes them from a real box, with these labels.
SUPERVISOR_SERIES = {"vgate_worker_restarts_total": {"reason"}, "vgate_workers_ready": set()}
TARGET_LABELS = {"job", "instance"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")')
_GROUPING = re.compile(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_NAME = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
_OPERATORS = {"and", "or", "unless", "bool", "offset"}
_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)\s*(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)")
_QUANTILE = re.compile(r"histogram_quantile\(\s*([\d.]+)")


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in _rules() if "alert" in rule}


def _recorded() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in _rules() if "record" in rule}


def _names(expr: str) -> set[str]:
    """Series names an expression selects: metrics and recorded rules (not functions, labels,
    keywords, durations or label values)."""
    text = _STRING.sub('""', expr)
    text = _SELECTOR.sub(lambda m: m.group(1), text)
    text = _GROUPING.sub("", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    return {n for n in _NAME.findall(text) if n not in _OPERATORS}


def _resolve(expr: str, recorded: dict[str, str]) -> str:
    """The expression with recorded rules replaced by their own expressions."""
    for _ in range(10):
        names = _names(expr) & recorded.keys()
        if not names:
            return expr
        for name in names:
            expr = re.sub(rf"(?<![\w:]){re.escape(name)}(?![\w:])", f"({recorded[name]})", expr)
    raise AssertionError(f"recorded rules nest too deep in {expr}")


def _matchers(expr: str) -> set[tuple[str, str, str, str]]:
    """(metric, label, operator, value) of every label matcher."""
    return {
        (metric, *matcher)
        for metric, body in _SELECTOR.findall(expr)
        for matcher in _MATCHER.findall(body)
    }


def _family(name: str, names: set[str]) -> str:
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return base if base in names else name


def _threshold(expr: str) -> float:
    """An alert's threshold: the first comparison with a number in its expression (the rules
    file's convention, which its header tells operators)."""
    found = _COMPARISON.search(_STRING.sub('""', expr))
    assert found, f"no threshold in {expr}"
    return float(found.group(2))


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = (
            "promtool is not installed (Debian: apt-get install --no-install-recommends prometheus)"
        )
        if os.environ.get("VGATE_REQUIRE_PROMTOOL"):
            pytest.fail(f"VGATE_REQUIRE_PROMTOOL is set but {reason}")
        pytest.skip(reason)
    return path


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_accepts_the_rules() -> None:
    result = _run(_promtool(), "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS
    result = _run(_promtool(), "test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases: dict[str, list[bool]] = {}
    for path in RULE_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                cases.setdefault(case["alertname"], []).append(bool(case.get("exp_alerts")))
    for name in _alerts():
        assert True in cases.get(name, []), f"{name}: no test where it fires"
        assert False in cases.get(name, []), f"{name}: no test where it stays quiet"
    assert cases.keys() <= _alerts().keys(), cases.keys() - _alerts().keys()


def test_alerts_say_how_bad_what_and_what_to_do() -> None:
    for name, rule in _alerts().items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations["summary"] and "To do:" in annotations["description"], name
        # The alert's series identify the appliance; per-model and per-engine alerts name them.
        text = annotations["summary"] + annotations["description"]
        assert "$labels.instance" in text or name == "VgateMetricsAbsent", name
        box = any(name in rule["expr"] for name in SUPERVISOR_SERIES)  # the box, no model
        if "model" in " ".join(_GROUPING.findall(rule["expr"])) or (
            "vgate_" in rule["expr"] and not box
        ):
            assert "$labels.model" in text, name


def test_rules_use_what_the_proxy_exposes(fake: FakeVLLM) -> None:
    """Scraped from a real proxy whose models have the samples the rules use: one answered
    stream (model "tiny") and one request shed for a full KV cache (model "full")."""
    with FakeVLLM(model="full") as full:
        full.kv_cache_usage = 0.99
        config = proxy_config(fake.base_url, admin={"enabled": True, "port": 0})
        config["models"]["full"] = {"upstreams": [full.base_url]}
        with ProxyServer.from_dict(config) as server:
            for model, status in (("tiny", 200), ("full", 503)):
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                response = httpx.post(
                    server.base_url + "/v1/chat/completions", json={**body, "stream": True}
                )
                assert response.status_code == status, response.text
            names, labels = exposed(httpx.get(admin_url(server) + "/metrics").text)
    names |= set(SUPERVISOR_SERIES)
    labels.update(SUPERVISOR_SERIES)

    recorded = _recorded()
    for rule in _rules():
        expr = rule["expr"]
        used = _names(expr)
        assert used, expr
        for name in used:
            if ":" in name:
                assert name in recorded, f"{name} is not recorded in {RULES.name}"
            else:
                family = _family(name, names)
                assert family in names | PROMETHEUS_SERIES, f"{name} is not exposed: {expr}"
        families = {_family(n, names) for n in _names(_resolve(expr, recorded))}
        known = set().union(*(labels.get(f, set()) for f in families)) | TARGET_LABELS
        if any(n.endswith("_bucket") for n in _names(_resolve(expr, recorded))):
            known.add("le")
        for group in _GROUPING.findall(expr):
            grouped = {g.strip() for g in group.split(",") if g.strip()}
            assert grouped <= known, (expr, grouped - known)
        for metric, label, _, value in _matchers(expr):
            family = _family(metric, names)
            if label in TARGET_LABELS:
                continue
            assert family in labels, f"no samples of {family} to check its labels"
            assert label in labels[family] | TARGET_LABELS, (expr, label)
            if label == "outcome":
                assert set(value.strip('"').split("|")) <= set(OUTCOMES), (expr, value)


def test_thresholds_are_those_the_proxy_means() -> None:
    alerts = _alerts()
    # An open breaker is 2 in vgate_upstream_breaker_state.
    assert _threshold(alerts["VgateBreakerOpen"]["expr"]) == BREAKER_STATES["open"]
    # The TTFT SLO sits on a bucket bound, so the quantile is exact at the threshold.
    assert _threshold(alerts["VgateTimeToFirstTokenSLO"]["expr"]) in TTFT_BUCKETS


def test_header_lists_every_alert_with_its_values() -> None:
    header = RULES.read_text().split("\ngroups:", 1)[0]
    for name, rule in _alerts().items():
        rows = [line for line in header.splitlines() if re.match(rf"#\s+{name}\s", line)]
        assert len(rows) == 1, f"{name} is not in the header's table"
        assert re.search(rf"\s{rule.get('for', '-')}(\s|$)", rows[0]), (name, rows[0])
        if name not in STATE_ALERTS:
            assert f"{_threshold(rule['expr']):g}" in rows[0], (name, rows[0])


def test_dashboard_draws_the_alert_thresholds() -> None:
    panels = {p["title"]: p for p in orjson.loads(DASHBOARD.read_bytes())["panels"]}
    recorded = _recorded()
    for name, rule in _alerts().items():
        title = rule["annotations"].get("panel")
        if name in STATE_ALERTS:
            continue
        assert title in panels, f"{name}: no dashboard panel {title!r}"
        panel = panels[title]
        defaults = panel["fieldConfig"]["defaults"]
        steps = [s["value"] for s in defaults["thresholds"]["steps"] if s["value"] is not None]
        assert _threshold(rule["expr"]) in steps, (name, title, steps)
        if panel["type"] == "timeseries":
            assert defaults["custom"]["thresholdsStyle"]["mode"] != "off", title
        else:
            assert defaults["color"]["mode"] == "thresholds", title
        # The panel plots what the alert measures: its metrics, matchers and quantile.
        alert = _resolve(rule["expr"], recorded)
        queries = " ".join(t["expr"] for t in panel["targets"])
        assert _names(alert) & _names(queries), (name, title)
        assert _matchers(alert) <= _matchers(queries), (name, _matchers(alert) - _matchers(queries))
        assert set(_QUANTILE.findall(alert)) <= set(_QUANTILE.findall(queries)), (name, title)
