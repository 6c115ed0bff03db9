"""The `Limits` table (requests and tokens per minute) shared by ratelimit and auth's keys."""

from __future__ import annotations

from dataclasses import dataclass

from policies.buckets import Bucket
from proxy.core.binder import check, positive


def _optional_positive(v: int | None) -> str | None:
    return None if v is None else positive(v)


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Budgets that refill continuously; `window` is how much of a minute's budget may be spent
    at once (60: a whole minute's worth in a burst; 1: evenly, no bursts)."""

    requests_per_minute: int | None = check(_optional_positive, None)
    tokens_per_minute: int | None = check(_optional_positive, None)
    window: float = check(lambda v: None if 0 < v <= 3600 else "must be in (0, 3600]", 60.0)

    def problems(self) -> list[str]:
        """Cross-field checks: a request budget must hold at least one request."""
        if self.requests_per_minute is not None and self.requests_per_minute * self.window < 60:
            return ["requests_per_minute * window / 60 must be at least 1 (one request)"]
        return []

    def buckets(self, prefix: str) -> tuple[Bucket | None, Bucket | None]:
        """(requests bucket, tokens bucket) under `prefix`; None where no limit is set."""
        requests = tokens = None
        if self.requests_per_minute is not None:
            rate = self.requests_per_minute / 60.0
            requests = Bucket(f"{prefix}:requests", rate, rate * self.window)
        if self.tokens_per_minute is not None:
            rate = self.tokens_per_minute / 60.0
            tokens = Bucket(f"{prefix}:tokens", rate, rate * self.window, tokens=True)
        return requests, tokens
