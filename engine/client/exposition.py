"""A small parser for the Prometheus text exposition format (what vLLM's `/metrics` serves).

Only what a scraper needs: samples with their labels and values. `# HELP` / `# TYPE` comments are
skipped, label values are unescaped (`\\\\`, `\\"`, `\\n`), values may be `NaN`, `+Inf`, `-Inf`,
and an optional timestamp after the value is ignored. A malformed line raises `ValueError` naming
the line, so a broken exporter is reported instead of silently read as zeros.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


@dataclass(frozen=True)
class Sample:
    name: str
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)


def parse(text: str) -> list[Sample]:
    """Every sample in `text`, in order."""
    samples = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            samples.append(_parse_line(line))
        except ValueError as exc:
            raise ValueError(f"metrics line {lineno}: {exc}: {line[:120]!r}") from None
    return samples


def _parse_line(line: str) -> Sample:
    end = 0
    while end < len(line) and line[end] not in "{ \t":
        end += 1
    name = line[:end]
    if not name:
        raise ValueError("missing metric name")
    labels: dict[str, str] = {}
    if end < len(line) and line[end] == "{":
        end = _parse_labels(line, end + 1, labels)
    fields = line[end:].split()
    if not fields or len(fields) > 2:
        raise ValueError("expected a value and an optional timestamp")
    return Sample(name, _parse_value(fields[0]), labels)


def _parse_labels(line: str, i: int, out: dict[str, str]) -> int:
    """Parse `k="v",...}` starting at `i`; return the index after the closing brace."""
    n = len(line)
    while True:
        while i < n and line[i] in " \t,":
            i += 1
        if i < n and line[i] == "}":
            return i + 1
        eq = line.find("=", i)
        if eq < 0:
            raise ValueError("label without '='")
        key = line[i:eq].strip()
        i = eq + 1
        if i >= n or line[i] != '"':
            raise ValueError(f"label {key!r} value is not quoted")
        i += 1
        chars = []
        while True:
            if i >= n:
                raise ValueError("unterminated label value")
            c = line[i]
            if c == "\\" and i + 1 < n:
                chars.append(_ESCAPES.get(line[i + 1], "\\" + line[i + 1]))
                i += 2
            elif c == '"':
                i += 1
                break
            else:
                chars.append(c)
                i += 1
        out[key] = "".join(chars)


def _parse_value(text: str) -> float:
    lowered = text.lower()
    if lowered == "nan":
        return math.nan
    if lowered in ("+inf", "inf"):
        return math.inf
    if lowered == "-inf":
        return -math.inf
    return float(text)


def values(samples: Iterable[Sample], *names: str) -> list[float]:
    """Values of the first of `names` that has samples (renamed metrics), NaN dropped."""
    pool = list(samples)
    for name in names:
        found = [s.value for s in pool if s.name == name]
        if found:
            return [v for v in found if not math.isnan(v)]
    return []
