"""`vgate status` as text: aligned tables, coloured only for a terminal."""

from __future__ import annotations

import time
from collections.abc import Sequence

from proxy.ops.status import EngineState, ModelState, Status, UpstreamState
from proxy.telemetry.window import SPAN

_CODES = {"good": "32", "warn": "33", "bad": "31", "dim": "2", "head": "1"}
KV_WARN = 0.8  # where the KV-cache alert (systemd/prometheus-alerts.yml) fires
_DETAIL_CHARS = 70

Cell = tuple[str, str | None]  # text, style


def render(status: Status, colour: bool, every: float | None = None) -> str:
    """The whole screen for one `Status`; `every`: the --watch interval, shown in the title."""
    paint = _Painter(colour)
    style = {"ready": "good", "degraded": "warn"}.get(status.state, "bad")
    lines = [_title(paint, status.proxy, (status.state, style), status.time, every), ""]
    lines += _table(paint, _MODEL_HEAD, [_model_row(m) for m in status.models])
    # Why a model is not ready is in its upstreams' rows (HEALTH, BREAKER, DETAIL).
    ups = [_upstream_row(m, u) for m in status.models for u in m.upstreams]
    lines += ["", *_table(paint, _UPSTREAM_HEAD, ups)]
    if status.engines:
        # A URL column only for engines vgate launches: an upstream URL is its engine's name.
        urls = any(e.engine != e.url for e in status.engines)
        head = _ENGINE_HEAD if urls else _ENGINE_HEAD[:1] + _ENGINE_HEAD[2:]
        lines += ["", *_table(paint, head, [_engine_row(e, urls) for e in status.engines])]
    window = status.window_seconds
    if status.admin_error is not None:
        what = "requests/s, TTFT and the engines' running/waiting/context are not shown"
        lines += ["", paint(f"no metrics: {status.admin_error}; {what}", "warn")]
    elif window is not None:
        since = " (since the proxy started)" if window < SPAN - 1 else ""
        note = f"REQ/S and TTFT: requests finished in the last {window:.0f} s{since}"
        lines += ["", paint(note, "dim")]
    return "\n".join(lines)


def render_unreachable(url: str, reason: str, colour: bool, every: float | None = None) -> str:
    """A --watch frame while the proxy does not answer."""
    paint = _Painter(colour)
    title = _title(paint, url, ("unreachable", "bad"), time.time(), every)
    return f"{title}\n\ncannot reach {url}: {reason} — is vgate running?"


def _title(paint: _Painter, url: str, state: Cell, at: float, every: float | None) -> str:
    title = f"vgate {url.removesuffix('/ready')}  {paint(*state)}  "
    title += time.strftime("%H:%M:%S", time.localtime(at))
    if every is not None:
        title += paint(f"  (every {every:g} s, Ctrl-C to stop)", "dim")
    return title


_MODEL_HEAD = ("MODEL", "STATE", ">IN-FLIGHT", ">QUEUED", ">REQ/S", ">TTFT P50", ">TTFT P95")
_UPSTREAM_HEAD = ("MODEL", "UPSTREAM", "HEALTH", "BREAKER", ">IN-FLIGHT", "DETAIL")
_ENGINE_HEAD = ("ENGINE", "URL", "MODELS", ">KV-CACHE", ">RUNNING", ">WAITING", ">CONTEXT")
_HEALTH_STYLE = {"healthy": "good", "warming up": "warn", "not probed": "warn"}
_BREAKER_STYLE = {"closed": "good", "half-open": "warn"}


def _model_row(m: ModelState) -> list[Cell]:
    rate = None if m.requests_per_second is None else f"{m.requests_per_second:.2f}"
    return [
        (m.name, None),
        ("ready", "good") if m.ready else ("not ready", "bad"),
        (str(m.in_flight), None),
        (str(m.queued), "warn" if m.queued else None),
        _maybe(rate),
        _maybe(_duration(m.ttft_p50)),
        _maybe(_duration(m.ttft_p95)),
    ]


def _upstream_row(m: ModelState, u: UpstreamState) -> list[Cell]:
    health = u.health
    if u.breaker == "open":
        detail = f"breaker retries in {u.breaker_retry_in:.0f} s"
    else:
        detail = u.error or ("warmed up" if u.warmed_up else "")
    if len(detail) > _DETAIL_CHARS:
        detail = detail[: _DETAIL_CHARS - 1] + "…"
    return [
        (m.name, None),
        (u.upstream, None),
        (health, _HEALTH_STYLE.get(health, "bad")),
        (u.breaker, _BREAKER_STYLE.get(u.breaker, "bad")),
        (str(u.in_flight), None),
        (detail, "dim" if u.ok else None),
    ]


def _engine_row(e: EngineState, urls: bool) -> list[Cell]:
    kv = e.kv_cache_usage
    named = [(e.url if e.engine != e.url else "", None)] if urls else []
    return [
        (e.engine, None),
        *named,
        (",".join(e.models) or "(no model)", None if e.models else "dim"),
        _maybe(
            None if kv is None else f"{kv * 100:.1f}%", "warn" if (kv or 0) >= KV_WARN else None
        ),
        _maybe(None if e.running is None else str(e.running)),
        _maybe(None if e.waiting is None else str(e.waiting), "warn" if e.waiting else None),
        _maybe(None if e.max_model_len is None else str(e.max_model_len)),
    ]


def _maybe(text: str | None, style: str | None = None) -> Cell:
    return ("-", "dim") if text is None else (text, style)


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def _table(paint: _Painter, head: Sequence[str], rows: list[list[Cell]]) -> list[str]:
    """Columns padded to their widest cell; a header starting with ">" is right-aligned."""
    names = [h.removeprefix(">") for h in head]
    right = [h.startswith(">") for h in head]
    widths = [max([len(n), *(len(r[i][0]) for r in rows)]) for i, n in enumerate(names)]

    def line(cells: Sequence[Cell]) -> str:
        out = []
        for (text, style), width, r in zip(cells, widths, right, strict=True):
            pad = " " * (width - len(text))
            out.append(pad + paint(text, style) if r else paint(text, style) + pad)
        return "  ".join(out).rstrip()

    return [line([(n, "head") for n in names]), *(line(r) for r in rows)]


class _Painter:
    """ANSI colour for a terminal; the text unchanged otherwise (a pipe, a file, NO_COLOR)."""

    def __init__(self, colour: bool) -> None:
        self.colour = colour

    def __call__(self, text: str, style: str | None) -> str:
        if not self.colour or style is None or not text:
            return text
        return f"\x1b[{_CODES[style]}m{text}\x1b[0m"
