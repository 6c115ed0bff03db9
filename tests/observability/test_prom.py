"""The registry's text format, read back by the same parser the engine monitor uses."""

from __future__ import annotations

import pytest

from engine.client import exposition as prometheus
from proxy.telemetry.registry import Gauge, Registry


def _samples(registry: Registry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = registry.render().decode()
    return {(s.name, frozenset(s.labels.items())): s.value for s in prometheus.parse(text)}


def test_counter_gauge_and_escaping() -> None:
    r = Registry()
    c = r.counter("t_total", "help", ("a",))
    c.labels('quo"te\\back\nline').inc()
    c.labels("x").inc(2.5)
    g = r.gauge("g", "help")
    g.labels().set(-3)
    text = r.render().decode()
    assert "# TYPE t_total counter" in text and "# TYPE g gauge" in text
    samples = _samples(r)
    assert samples["t_total", frozenset({("a", 'quo"te\\back\nline')})] == 1
    assert samples["t_total", frozenset({("a", "x")})] == 2.5
    assert samples["g", frozenset()] == -3


def test_histogram_buckets_are_cumulative_with_le_inclusive() -> None:
    r = Registry()
    h = r.histogram("h_seconds", "help", ("m",), buckets=(0.1, 1))
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.labels("a").observe(v)
    s = _samples(r)
    bucket = {
        le: s["h_seconds_bucket", frozenset({("m", "a"), ("le", le)})]
        for le in ("0.1", "1", "+Inf")
    }
    assert bucket == {"0.1": 2, "1": 4, "+Inf": 5}
    assert s["h_seconds_count", frozenset({("m", "a")})] == 5
    assert s["h_seconds_sum", frozenset({("m", "a")})] == pytest.approx(8.65)


def test_children_are_capped_and_names_unique() -> None:
    g = Gauge("g", "help", ("k",), max_children=3)
    for i in range(10):
        g.labels(f"v{i}").inc()
    out: list[str] = []
    g.render(out)
    # Past the cap, new label sets fold into one child: memory and the scrape stay bounded.
    assert out[2:] == ['g{k="v0"} 1', 'g{k="v1"} 1', 'g{k="v2"} 1', 'g{k="other"} 7']
    r = Registry()
    r.counter("x_total", "help")
    with pytest.raises(ValueError, match="twice"):
        r.counter("x_total", "help")
    with pytest.raises(ValueError, match="expected labels"):
        r.gauge("y", "help", ("a", "b")).labels("only-one")
