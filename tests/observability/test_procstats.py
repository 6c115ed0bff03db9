"""The process figures read from /proc, and the event loop's task count, as /metrics shows them."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.client import exposition as prometheus
from proxy.telemetry.metrics import ProxyMetrics
from proxy.telemetry.procstats import ProcReader

linux = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

PROCESS_METRICS = {
    "process_cpu_seconds_total": "counter",
    "process_virtual_memory_bytes": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_start_time_seconds": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
}


def _samples(text: str) -> dict[str, float]:
    return {s.name: s.value for s in prometheus.parse(text) if not s.labels}


@linux
def test_figures_are_this_process() -> None:
    reader = ProcReader()
    stats = reader.read()
    assert stats is not None
    # The listing holds one more fd while it runs (its own directory handle), as ours did.
    assert abs(stats.open_fds - len(os.listdir("/proc/self/fd"))) <= 2
    assert stats.open_fds > 0
    assert stats.max_fds == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert stats.resident_bytes > 10 * 2**20  # an interpreter with pytest loaded
    assert stats.virtual_bytes >= stats.resident_bytes
    assert stats.start_time <= time.time()
    # Burn CPU until the kernel's tick counter moves (10 ms at the usual 100 Hz).
    deadline = time.monotonic() + 5
    while (later := reader.read()) is not None and later.cpu_seconds <= stats.cpu_seconds:
        assert time.monotonic() < deadline, "cpu seconds did not increase"
        sum(i * i for i in range(10_000))
    assert later is not None and later.cpu_seconds > stats.cpu_seconds


@linux
def test_start_time_is_when_the_process_started() -> None:
    before = time.time()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stats = ProcReader(Path(f"/proc/{child.pid}")).read()
    finally:
        child.kill()
        child.wait()
    assert stats is not None
    # btime is whole seconds and starttime clock ticks: a second of slack either way.
    assert before - 1.5 <= stats.start_time <= time.time() + 1.5


def test_absent_without_proc(tmp_path: Path) -> None:
    reader = ProcReader(tmp_path / "self", tmp_path)
    assert reader.read() is None
    assert list(reader.families()) == []


@linux
def test_rendered_with_prometheus_client_names_and_types() -> None:
    text = ProxyMetrics(lambda: None).registry.render().decode()
    for name, kind in PROCESS_METRICS.items():
        assert f"# TYPE {name} {kind}\n" in text
    samples = _samples(text)
    assert samples["process_resident_memory_bytes"] > 10 * 2**20
    assert samples["process_open_fds"] > 0
    # Outside an event loop there is no loop to count tasks of.
    assert "vgate_event_loop_tasks" not in samples


async def test_event_loop_tasks_counts_the_scraping_loop() -> None:
    registry = ProxyMetrics(lambda: None).registry
    before = _samples(registry.render().decode())["vgate_event_loop_tasks"]
    assert before == len(asyncio.all_tasks()) >= 1
    sleepers = [asyncio.create_task(asyncio.sleep(30)) for _ in range(5)]
    try:
        assert _samples(registry.render().decode())["vgate_event_loop_tasks"] == before + 5
    finally:
        for task in sleepers:
            task.cancel()
        await asyncio.gather(*sleepers, return_exceptions=True)
    assert _samples(registry.render().decode())["vgate_event_loop_tasks"] == before
