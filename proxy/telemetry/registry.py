"""A small Prometheus registry: counters, gauges, histograms and the text exposition format.

Why not `prometheus_client`: its default registry is process-global (we build one per app, so a
reload or a second app in a test never shares counters), and every observation takes a lock we
do not need (all updates run on the event loop thread). What the proxy needs is a dict lookup of
a cached child per label tuple and an add, about 0.2 µs; the format is a few lines to write.

Label values are the caller's job to bound (configured names only); as a last defence a family
stops creating children past `max_children` and folds new label sets into one `other` child, so
a bug can never grow memory or the scrape without limit.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

LabelValues = tuple[object, ...]
MAX_CHILDREN = 2000


def _escape(value: object) -> str:
    text = str(value)
    if "\\" in text or '"' in text or "\n" in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return text


def format_number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _labels(names: Sequence[str], values: Iterable[object], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


C = TypeVar("C")


class Family(Generic[C]):
    """Samples sharing a name, a type and label names; children are created once, then cached."""

    kind = "untyped"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        max_children: int = MAX_CHILDREN,
    ) -> None:
        self.name = name
        self.help = help
        self.label_names = tuple(labels)
        self.max_children = max_children
        self._children: dict[LabelValues, C] = {}

    def labels(self, *values: object) -> C:
        """The child for these label values (in `labels` order), created on first use."""
        child = self._children.get(values)
        return child if child is not None else self._create(values)

    def _create(self, values: LabelValues) -> C:
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name}: expected labels {self.label_names}, got {values}")
        if len(self._children) >= self.max_children:
            values = ("other",) * len(self.label_names)
            child = self._children.get(values)
            if child is not None:
                return child
        child = self._children[values] = self._new()
        return child

    def _new(self) -> C:
        raise NotImplementedError

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for values, child in self._children.items():
            self._render_child(out, values, child)

    def _render_child(self, out: list[str], values: LabelValues, child: C) -> None:
        raise NotImplementedError


class Value:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = value


class Counter(Family[Value]):
    """A monotonically increasing total (name ends in `_total`)."""

    kind = "counter"

    def _new(self) -> Value:
        return Value()

    def _render_child(self, out: list[str], values: LabelValues, child: Value) -> None:
        out.append(f"{self.name}{_labels(self.label_names, values)} {format_number(child.value)}")


class Gauge(Counter):
    """A value that goes up and down (`set` as well as `inc`)."""

    kind = "gauge"


class HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Bucket i counts values <= bounds[i]; cumulated only when rendered.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class Histogram(Family[HistogramChild]):
    """Observations counted in fixed buckets (upper bounds, ascending; +Inf is implicit)."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        max_children: int = MAX_CHILDREN,
    ) -> None:
        super().__init__(name, help, labels, max_children)
        bounds = tuple(float(b) for b in buckets)
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"{name}: buckets must be ascending and distinct")
        self.bounds = bounds

    def _new(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def _render_child(self, out: list[str], values: LabelValues, child: HistogramChild) -> None:
        cumulative = 0
        for bound, count in zip((*self.bounds, math.inf), child.counts, strict=True):
            cumulative += count
            le = f'le="{format_number(bound)}"'
            out.append(f"{self.name}_bucket{_labels(self.label_names, values, le)} {cumulative}")
        labels = _labels(self.label_names, values)
        out.append(f"{self.name}_sum{labels} {format_number(child.sum)}")
        out.append(f"{self.name}_count{labels} {cumulative}")


Collector = Callable[[], Iterable[Family[Any]]]


class Registry:
    """Families updated as things happen, plus collectors that build families at scrape time."""

    def __init__(self) -> None:
        self._families: dict[str, Family[Any]] = {}
        self._collectors: list[Collector] = []
        self._before: list[Callable[[], None]] = []

    def add(self, family: Family[Any]) -> None:
        if family.name in self._families:
            raise ValueError(f"metric {family.name} is registered twice")
        self._families[family.name] = family

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        family = Counter(name, help, labels)
        self.add(family)
        return family

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        family = Gauge(name, help, labels)
        self.add(family)
        return family

    def histogram(
        self, name: str, help: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> Histogram:
        family = Histogram(name, help, labels, buckets=buckets)
        self.add(family)
        return family

    def collector(self, collect: Collector) -> None:
        self._collectors.append(collect)

    def before_render(self, hook: Callable[[], None]) -> None:
        """Run `hook` at the start of every scrape (to record what is still batched)."""
        self._before.append(hook)

    def render(self) -> bytes:
        """Everything in the Prometheus text format 0.0.4."""
        for hook in self._before:
            hook()
        out: list[str] = []
        for family in self._families.values():
            family.render(out)
        for collect in self._collectors:
            for family in collect():
                family.render(out)
        out.append("")
        return "\n".join(out).encode()


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
