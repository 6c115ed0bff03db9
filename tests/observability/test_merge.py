"""Merging the expositions of a box's workers (proxy.telemetry.merge) as each metric means."""

from __future__ import annotations

from proxy.telemetry.merge import Merger, parse


def exposition(requests: float, in_flight: float, breaker: float, healthy: float) -> str:
    return "\n".join(
        [
            "# HELP vgate_requests_total Requests.",
            "# TYPE vgate_requests_total counter",
            f'vgate_requests_total{{model="m",status="200"}} {requests}',
            "# HELP vgate_request_duration_seconds Durations.",
            "# TYPE vgate_request_duration_seconds histogram",
            f'vgate_request_duration_seconds_bucket{{le="0.1"}} {requests}',
            f'vgate_request_duration_seconds_bucket{{le="+Inf"}} {requests}',
            f"vgate_request_duration_seconds_sum {requests / 10}",
            f"vgate_request_duration_seconds_count {requests}",
            "# HELP vgate_requests_in_flight In flight.",
            "# TYPE vgate_requests_in_flight gauge",
            f"vgate_requests_in_flight {in_flight}",
            "# HELP vgate_upstream_breaker_state Breaker.",
            "# TYPE vgate_upstream_breaker_state gauge",
            f'vgate_upstream_breaker_state{{upstream="u"}} {breaker}',
            "# HELP vgate_upstream_healthy Healthy.",
            "# TYPE vgate_upstream_healthy gauge",
            f'vgate_upstream_healthy{{upstream="u"}} {healthy}',
            "# HELP vgate_engine_kv_cache_usage_ratio KV.",
            "# TYPE vgate_engine_kv_cache_usage_ratio gauge",
            'vgate_engine_kv_cache_usage_ratio{upstream="u"} 0.25',
            "# HELP process_start_time_seconds Start.",
            "# TYPE process_start_time_seconds gauge",
            f"process_start_time_seconds {1000 + requests}",
            "",
        ]
    )


OWN = parse(
    "# HELP process_start_time_seconds Start.\n# TYPE process_start_time_seconds gauge\n"
    "process_start_time_seconds 5\n"
)


def merged(merger: Merger, *texts: str) -> dict[str, float]:
    out = parse(merger.merge([parse(t) for t in texts], OWN).decode())
    return {key: value for key, (_, value) in out.series.items()}


def test_counters_and_histograms_add_up_and_gauges_merge_by_meaning() -> None:
    box = merged(Merger(), exposition(3, 1, 0, 1), exposition(4, 2, 2, 0))
    assert box['vgate_requests_total{model="m",status="200"}'] == 7
    assert box['vgate_request_duration_seconds_bucket{le="+Inf"}'] == 7
    assert box["vgate_request_duration_seconds_count"] == 7
    assert box["vgate_requests_in_flight"] == 3  # loads add up
    assert box['vgate_upstream_breaker_state{upstream="u"}'] == 2  # the worst: open somewhere
    assert box['vgate_upstream_healthy{upstream="u"}'] == 0  # unreachable from one worker
    assert box['vgate_engine_kv_cache_usage_ratio{upstream="u"}'] == 0.25  # one engine, once
    assert box["process_start_time_seconds"] == 5  # the supervisor's: restarts of the box


def test_a_retired_worker_keeps_its_counts_and_drops_its_gauges() -> None:
    merger = Merger()
    first, second = exposition(3, 1, 0, 1), exposition(4, 2, 0, 1)
    assert merged(merger, first, second)['vgate_requests_total{model="m",status="200"}'] == 7
    merger.retire(parse(second))  # that worker died; its replacement starts from zero
    box = merged(merger, first, exposition(0, 0, 0, 1))
    assert box['vgate_requests_total{model="m",status="200"}'] == 7
    assert box["vgate_request_duration_seconds_sum"] == 0.7
    assert box["vgate_requests_in_flight"] == 1
    merger.retire(parse(exposition(1, 0, 0, 1)))
    box = merged(merger, first, exposition(2, 0, 0, 1))
    assert box['vgate_requests_total{model="m",status="200"}'] == 10


def test_the_merged_exposition_keeps_help_and_type_once_per_family() -> None:
    text = Merger().merge([parse(exposition(1, 0, 0, 1)), parse(exposition(1, 0, 0, 1))], OWN)
    lines = text.decode().splitlines()
    assert lines.count("# TYPE vgate_requests_total counter") == 1
    assert lines.count("# HELP vgate_requests_total Requests.") == 1
    assert lines[lines.index("# TYPE vgate_request_duration_seconds histogram") + 1].startswith(
        "vgate_request_duration_seconds_bucket"
    )
