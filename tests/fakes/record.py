"""What the fake vLLM saw, as plain data for assertions (`FakeVLLM.seen`, `FakeVLLM.streams()`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Seen:
    """One request as it arrived."""

    method: str
    path: str  # the request target, query string included
    headers: dict[str, str]
    body: Any  # parsed JSON, or None
    raw: bytes
    at: float  # time.monotonic()

    @property
    def route(self) -> str:
        """The path without its query string."""
        return self.path.partition("?")[0]

    @property
    def query(self) -> dict[str, str]:
        pairs = (p.partition("=") for p in self.path.partition("?")[2].split("&") if p)
        return {k: v for k, _, v in pairs}


@dataclass(frozen=True)
class Cancelled:
    """A response the client closed the connection on before it was complete."""

    path: str
    request_id: str | None
    events_sent: int
    at: float  # time.monotonic()


@dataclass(frozen=True)
class Streaming:
    """A stream in progress (`FakeVLLM.streams()`)."""

    path: str
    request_id: str | None
    events_sent: int
    bytes_sent: int  # the events written to the transport, chunk framing included
    buffered: int  # of those, still in the transport's buffer: not yet taken by the kernel
    writing_paused: bool  # the transport is above its high-water mark


@dataclass
class Record:
    connections: int = 0
    requests: list[Seen] = field(default_factory=list)
    cancelled: list[Cancelled] = field(default_factory=list)
    inflight: int = 0  # inference requests being answered (what /metrics reports as running)
    max_inflight: int = 0
    heads_sent: int = 0  # inference responses whose status line and headers were sent
