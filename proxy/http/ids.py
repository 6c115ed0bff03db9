"""Request ids: kept from the client when valid, else made; on every log line and upstream."""

from __future__ import annotations

import itertools
import re
import secrets

from starlette.datastructures import Headers

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIds:
    """A valid incoming X-Request-ID is kept (for tracing across hops); otherwise a new one.

    New ids are a random per-process prefix and a counter: unique across restarts and
    processes sharing a Redis, and a fraction of the cost of fresh randomness per request.
    They identify, they do not authorise: being predictable costs nothing.
    """

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(6)
        self._next = itertools.count(1).__next__

    def __call__(self, headers: Headers) -> str:
        incoming = headers.get("x-request-id")
        if incoming and _REQUEST_ID.fullmatch(incoming):
            return incoming
        return f"{self._prefix}{self._next():012x}"
