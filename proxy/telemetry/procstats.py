"""The process's own figures (memory, fds, CPU, start time), read from /proc at scrape time.

Names and meanings are those of prometheus_client's process collector, so the dashboards and
alerts operators already have for Python services work unchanged. Everything is read when
Prometheus scrapes: a few small files and one directory listing (tens of microseconds), nothing
per request. On a system without /proc (not Linux) there are no samples at all, rather than
zeros that would look like a process using no memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.telemetry.registry import Counter, Family, Gauge


@dataclass(frozen=True)
class ProcStats:
    resident_bytes: int
    virtual_bytes: int
    cpu_seconds: float  # user + system
    start_time: float  # seconds since the epoch
    open_fds: int
    max_fds: int | None  # None: unlimited


class ProcReader:
    """Reads one process's figures from `proc` (/proc/self unless a test points elsewhere)."""

    def __init__(self, proc: Path = Path("/proc/self"), root: Path = Path("/proc")) -> None:
        self._proc = proc
        self._root = root
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._boot: float | None = None  # boot time, read once: it does not change

    def read(self) -> ProcStats | None:
        """The current figures, or None where /proc is missing or unreadable."""
        try:
            with open(self._proc / "stat", "rb") as fh:
                stat = fh.read()
            open_fds = len(os.listdir(self._proc / "fd"))
            max_fds = self._max_fds()
            if self._boot is None:
                self._boot = self._boot_time()
        except (OSError, ValueError):
            return None
        # The command name (field 2) is in parentheses and may hold spaces or parentheses:
        # split after the last ")". Field n of man 5 proc is then index n - 3.
        fields = stat.rsplit(b")", 1)[1].split()
        return ProcStats(
            resident_bytes=int(fields[21]) * self._page,
            virtual_bytes=int(fields[20]),
            cpu_seconds=(int(fields[11]) + int(fields[12])) / self._ticks,
            start_time=self._boot + int(fields[19]) / self._ticks,
            open_fds=open_fds,
            max_fds=max_fds,
        )

    def _max_fds(self) -> int | None:
        with open(self._proc / "limits", "rb") as fh:
            for line in fh:
                if line.startswith(b"Max open files"):
                    soft = line.split()[3]  # "Max open files  <soft> <hard> files"
                    return None if soft == b"unlimited" else int(soft)
        return None

    def _boot_time(self) -> float:
        with open(self._root / "stat", "rb") as fh:
            for line in fh:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
        raise ValueError("no btime in /proc/stat")

    def families(self) -> Iterator[Family[Any]]:
        """The figures as Prometheus families (none when they cannot be read)."""
        stats = self.read()
        if stats is None:
            return
        cpu = Counter("process_cpu_seconds_total", _CPU_HELP)
        cpu.labels().set(stats.cpu_seconds)
        yield cpu
        for name, help, attribute in _GAUGES:
            value = getattr(stats, attribute)
            if value is not None:
                gauge = Gauge(name, help)
                gauge.labels().set(value)
                yield gauge


# prometheus_client's names and help texts.
_CPU_HELP = "Total user and system CPU time spent in seconds."
_GAUGES = (
    ("process_virtual_memory_bytes", "Virtual memory size in bytes.", "virtual_bytes"),
    ("process_resident_memory_bytes", "Resident memory size in bytes.", "resident_bytes"),
    (
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        "start_time",
    ),
    ("process_open_fds", "Number of open file descriptors.", "open_fds"),
    ("process_max_fds", "Maximum number of open file descriptors.", "max_fds"),
)
