"""The Prometheus text parser, on vLLM's real shapes and the format's corner cases."""

from __future__ import annotations

import math

import pytest

from engine.client import exposition as prometheus

VLLM_SAMPLE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 1.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 7.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"} 7.0
python_gc_objects_collected_total{generation="0"} 1234.0
"""


def test_vllm_metrics() -> None:
    samples = prometheus.parse(VLLM_SAMPLE)
    assert len(samples) == 7
    first = samples[0]
    assert first.name == "vllm:num_requests_running"
    assert first.labels == {"engine": "0", "model_name": "tiny"}
    assert first.value == 3.0
    assert prometheus.values(samples, "vllm:kv_cache_usage_perc") == [0.25]
    bucket = samples[4]
    assert bucket.labels["le"] == "+Inf"


def test_values_prefers_the_first_name_present() -> None:
    old = prometheus.parse('vllm:gpu_cache_usage_perc{model_name="m"} 0.5\n')
    names = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    assert prometheus.values(old, *names) == [0.5]
    both = prometheus.parse("vllm:gpu_cache_usage_perc 0.5\nvllm:kv_cache_usage_perc 0.1\n")
    assert prometheus.values(both, *names) == [0.1]
    assert prometheus.values(both, "missing") == []


def test_special_values_and_timestamps() -> None:
    samples = prometheus.parse("a NaN\nb +Inf\nc -Inf 1700000000000\nd 1e-3\ne{} 2\n")
    assert math.isnan(samples[0].value)
    assert [s.value for s in samples[1:]] == [math.inf, -math.inf, 0.001, 2.0]
    assert samples[4].labels == {}
    assert prometheus.values(samples, "a") == []  # NaN is "no value", not a number to act on


def test_label_escapes_commas_and_braces_inside_values() -> None:
    line = r'm{path="C:\\dir",quote="say \"hi\"",nl="a\nb",odd="x,y}z",} 1'
    (sample,) = prometheus.parse(line)
    assert sample.labels == {"path": "C:\\dir", "quote": 'say "hi"', "nl": "a\nb", "odd": "x,y}z"}
    assert sample.value == 1.0


def test_blank_lines_comments_and_eof_marker() -> None:
    assert prometheus.parse("\n   \n# EOF\n# just a comment\n") == []


@pytest.mark.parametrize(
    "line",
    ["m{a=1} 2", 'm{a="1" 2', "m", "m 1 2 3", "m abc", '{a="b"} 1'],
)
def test_malformed_lines_are_errors_naming_the_line(line: str) -> None:
    with pytest.raises(ValueError, match="metrics line 2"):
        prometheus.parse("ok 1\n" + line + "\n")
