"""One `/metrics` for a box of worker processes: their expositions merged as each metric means.

Counters and histograms are sums over the workers. A worker that exits leaves its last scraped
values behind as "retired" totals, added to every later merge: the box's counters never go
backwards when a worker is restarted (which Prometheus would read as a reset and count the
whole total again). What a killed worker counted after its last scrape is lost: the supervisor
scrapes every few seconds, so at most that much.

Gauges are per process, and merged by what they mean: loads (in flight, queued, memory, fds)
add up; what every worker reads off the same engine (KV cache, the engine's queues) is the same
number, so the largest is taken; states are the worst any worker sees (a breaker open in one
worker, an upstream one worker cannot reach); the start time is the supervisor's own, the
process systemd restarts (a worker's restart is `vgate_worker_restarts_total`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from proxy.telemetry.registry import format_number

_SUMMED = frozenset({"counter", "histogram"})
# A quantile of the box is not a sum of the workers': the slowest worker's is the honest bound.
_MAX = frozenset({"vgate_upstream_breaker_state", "process_max_fds", "vgate_recent_ttft_seconds"})
_MIN = frozenset({"vgate_model_ready", "vgate_upstream_healthy", "vgate_recent_window_seconds"})
_OWN = frozenset({"process_start_time_seconds"})  # the supervisor's value, not the workers'


@dataclass
class Scrape:
    """One exposition: families (name -> kind, help) and series (text -> family, value), in
    the order they came. A series is keyed by its text before the value (name and labels as
    the registry rendered them): the same series renders the same in every worker."""

    families: dict[str, tuple[str, str]] = field(default_factory=dict)
    series: dict[str, tuple[str, float]] = field(default_factory=dict)


def parse(text: str) -> Scrape:
    """A registry's exposition (proxy.telemetry.registry: no timestamps); lines it cannot read
    are skipped rather than failing the box's whole /metrics."""
    scrape = Scrape()
    family, kind, help_text = "", "untyped", ""
    for line in text.splitlines():
        if line.startswith("# HELP "):
            _, _, family, help_text = ([*line.split(" ", 3), ""])[:4]
        elif line.startswith("# TYPE "):
            parts = line.split(" ")
            if len(parts) == 4:
                family, kind = parts[2], parts[3]
                scrape.families[family] = (kind, help_text)
        elif line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                scrape.series[key] = (family, float(value))
            except ValueError:
                continue
    return scrape


def _gauge(family: str, values: list[float]) -> float:
    if family in _MAX or family.startswith("vgate_engine_"):
        return max(values)
    if family in _MIN:
        return min(values)
    return sum(values)


class Merger:
    """Merges worker scrapes; `retire` a worker's last scrape when it exits."""

    def __init__(self) -> None:
        self._retired = Scrape()

    def retire(self, scrape: Scrape) -> None:
        kinds = scrape.families
        for key, (family, value) in scrape.series.items():
            if kinds.get(family, ("gauge", ""))[0] in _SUMMED:
                old = self._retired.series.get(key, (family, 0.0))[1]
                self._retired.series[key] = (family, old + value)
                self._retired.families.setdefault(family, kinds[family])

    def merge(self, workers: Iterable[Scrape], own: Scrape) -> bytes:
        """The box's exposition: the workers' (and the retired) merged, then the supervisor's
        own series (which replace the workers' where the supervisor's value is the box's)."""
        scrapes = [*workers, self._retired]
        families: dict[str, tuple[str, str]] = {}
        values: dict[str, dict[str, list[float]]] = {}  # family -> series -> values
        for scrape in (*scrapes, own):
            for name, meta in scrape.families.items():
                families.setdefault(name, meta)
        for scrape in scrapes:
            for key, (family, value) in scrape.series.items():
                if family not in _OWN:
                    values.setdefault(family, {}).setdefault(key, []).append(value)
        for key, (family, value) in own.series.items():
            values.setdefault(family, {})[key] = [value]
        out: list[str] = []
        for name, (kind, help_text) in families.items():
            series = values.get(name)
            if not series:
                continue
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for key, found in series.items():
                total = sum(found) if kind in _SUMMED else _gauge(name, found)
                out.append(f"{key} {format_number(total)}")
        out.append("")
        return "\n".join(out).encode()
