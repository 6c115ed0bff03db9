"""What a route of the fake answers: a whole body, or a stream the connection writes event by
event (where the stream faults apply). Routes build these; `tests.fakes.wire` sends them, as
`planned` and `pieces` say the faults change them."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

Fault = dict[str, Any]  # the request's `"fake"` object merged over the server's defaults


@dataclass(frozen=True)
class Whole:
    status: int
    body: bytes
    ctype: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Stream:
    """An SSE body in the route's own framing.

    `events` is consumed lazily, as the events are written, so a stalled stream never builds what
    it did not send. `error` is what `error_event_after` sends in place of the rest: the route's
    error event(s), or None when the real engine just drops the connection (Responses API).
    `done` runs once the whole stream was written (e.g. the Responses store keeps the answer).
    `cut_after`: the route itself drops the connection after this many events (as vLLM does
    when its stream generator raises), whatever the faults say.
    """

    events: Iterable[bytes]
    tail: tuple[bytes, ...] = ()
    error: tuple[bytes, ...] | None = ()
    done: Callable[[], None] | None = None
    cut_after: int | None = None


Reply = Whole | Stream


def json_reply(data: Any, status: int = 200) -> Whole:
    return Whole(status, orjson.dumps(data))


_ENDLESS_PIECE = b"data: " + b"x" * (64 * 1024)  # `endless_event`: an event with no blank line


def planned(stream: Stream, fault: Fault) -> tuple[Iterable[bytes], bool]:
    """The events to write, after the faults that change them; and whether the connection
    is then dropped without the chunked terminator (vLLM's generator raising)."""
    events: Iterable[bytes] = stream.events
    tail: tuple[bytes, ...] = stream.tail
    cut_after = stream.cut_after
    endless = fault.get("endless_event")
    if endless:
        # An event that never ends: the proxy must bound what it holds of it.
        count = int(endless) // (64 * 1024)
        first = itertools.islice(events, 1)
        events, tail = itertools.chain(first, itertools.repeat(_ENDLESS_PIECE, count)), ()
    error_after = fault.get("error_event_after")
    if error_after is not None:
        events = itertools.islice(events, error_after)
        if stream.error is None:
            cut_after = error_after if cut_after is None else min(cut_after, error_after)
        tail = stream.error or ()
    end_after = fault.get("end_after_events")
    if end_after is not None:
        # A clean end, without the route's terminal event(s) ([DONE]).
        extra = tuple(e for e in tail if e not in stream.tail)
        events, tail = itertools.islice(itertools.chain(events, extra), end_after), ()
    if cut_after is not None:
        events, tail = itertools.islice(events, cut_after), ()
    return itertools.chain(events, tail), cut_after is not None


def pieces(data: bytes, split: Any) -> list[bytes]:
    """The body cut as the `split` fault asks: every byte, pieces of a size, or at offsets."""
    if split == "every_byte":
        return [data[i : i + 1] for i in range(len(data))]
    if isinstance(split, int) and split > 0:
        return [data[i : i + split] for i in range(0, len(data), split)]
    if isinstance(split, list):
        cuts = [0, *sorted(c for c in split if 0 < c < len(data)), len(data)]
        return [data[a:b] for a, b in itertools.pairwise(cuts) if b > a]
    return [data]
