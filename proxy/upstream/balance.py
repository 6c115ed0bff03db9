"""Choosing an upstream: which are eligible, and the `least_outstanding` balancer among them.

Eligible: not excluded by the caller, breaker not open (or due for a probe), not over the
KV-cache limit when one applies, healthy unless the caller accepts unhealthy ones as a last
resort. The balancer then picks among them (`proxy.upstream.modules.Balancer`). The built-in one
takes the upstream with the fewest requests in flight; with an affinity key (a hash of the
conversation's first messages) it picks by rendezvous hashing, so losing one upstream moves only
its share, unless that upstream is clearly busier than the rest: vLLM's prefix cache then pays
off without hot-spotting.
"""

from __future__ import annotations

import zlib
from collections.abc import Container, Sequence
from typing import Any

from proxy.upstream.model import ModelRoute, Upstream
from proxy.upstream.modules import Balancer, C

# Affinity yields to least-outstanding when its choice has this many more requests in flight
# than the least busy candidate, plus the same again as a fraction of that candidate's load.
_SLACK = 4
_SLACK_RATIO = 0.5
_KEY_CHARS = 8192


def affinity_key(body: dict[str, Any], messages: int) -> int | None:
    """A hash of the first `messages` chat turns (or the prompt's start); None if there is none."""
    turns = body.get("messages")
    if isinstance(turns, list) and turns:
        parts = []
        for turn in turns[:messages]:
            if isinstance(turn, dict):
                content = turn.get("content")
                parts.append(f"{turn.get('role')}\x1f{content if isinstance(content, str) else ''}")
        text = "\x1e".join(parts)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return None
        text = prompt
    if not text:
        return None
    return zlib.crc32(text[:_KEY_CHARS].encode("utf-8", "surrogatepass"))


class LeastOutstanding:
    """Fewest requests in flight; prefix affinity by rendezvous hashing within a slack."""

    def select(self, candidates: Sequence[C], key: int | None) -> C | None:
        if not candidates:
            return None
        best = candidates[0]
        for u in candidates:
            if u.inflight < best.inflight:
                best = u
        if key is not None and len(candidates) > 1:
            target = max(candidates, key=lambda u: zlib.crc32(u.label_bytes, key))
            if target.inflight <= best.inflight + _SLACK + best.inflight * _SLACK_RATIO:
                return target
        return best


_DEFAULT = LeastOutstanding()


class Choice:
    """What `pick` found: the upstream, or why there is none."""

    __slots__ = ("kv_blocked", "upstream")

    def __init__(self) -> None:
        self.upstream: Upstream | None = None
        self.kv_blocked = False  # some candidate was left out only for its KV-cache usage


def pick(
    upstreams: Sequence[Upstream],
    choice: Choice,
    *,
    skip: Container[Upstream] = (),
    unhealthy: bool = False,
    kv_limit: float | None = None,
    key: int | None = None,
    balancer: Balancer = _DEFAULT,
) -> Upstream | None:
    """The balancer's choice among the eligible `upstreams` (also in `choice.upstream`).

    `unhealthy`: consider only upstreams the monitor reports as failing (the last resort).
    """
    first: Upstream | None = None
    more: list[Upstream] | None = None
    for u in upstreams:
        if u in skip or (u.monitor.healthy is False) is not unhealthy or not u.breaker.allows():
            continue
        if kv_limit is not None:
            kv = u.monitor.kv_cache_usage
            if kv is not None and kv > kv_limit:
                choice.kv_blocked = True
                continue
        if first is None:
            first = u
        elif more is None:
            more = [first, u]
        else:
            more.append(u)
    # One eligible upstream (the common case) needs no list and no balancer call.
    best = balancer.select(more, key) if more is not None else first
    choice.upstream = best
    return best


def choose(
    chain: list[ModelRoute],
    choice: Choice,
    tried: list[Upstream],
    refused: list[Upstream],
    key: int | None,
    kv_limit: float | None,
    balancer: Balancer = _DEFAULT,
) -> ModelRoute | None:
    """The route and upstream (in `choice`) to try next, in order of preference: untried and
    healthy, then tried and healthy (a retry), then upstreams the monitor reports as failing."""
    if not tried and not refused:
        # A request's first choice (the common case): no exclusions to combine.
        for unhealthy in (False, True):
            for route in chain:
                found = pick(
                    route.upstreams,
                    choice,
                    unhealthy=unhealthy,
                    kv_limit=kv_limit,
                    key=key,
                    balancer=balancer,
                )
                if found is not None:
                    return route
        return None
    skip: list[Upstream] = tried + refused if refused else tried
    for unhealthy in (False, True):
        for excluded in (skip, refused):
            for route in chain:
                found = pick(
                    route.upstreams,
                    choice,
                    skip=excluded,
                    unhealthy=unhealthy,
                    kv_limit=kv_limit,
                    key=key,
                    balancer=balancer,
                )
                if found is not None:
                    return route
            if not tried:
                break
    return None


def least_busy(route: ModelRoute) -> Upstream:
    """For side calls such as /tokenize: the least busy available upstream (any, if none is)."""
    chosen = pick(route.upstreams, Choice())
    return chosen or min(route.upstreams, key=lambda u: u.inflight)
