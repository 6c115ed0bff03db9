"""Small helpers for the real-socket proxy tests."""

from __future__ import annotations

import socket
import time
from typing import Any
from urllib.parse import urlsplit

import orjson

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


def chat(tokens: int = 4, stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": tokens,
        "stream": stream,
    }
    body.update(extra)
    return body


def events(body: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order."""
    out = []
    for block in body.split(b"\n\n"):
        if block.startswith(b"data: "):
            out.append(block[len(b"data: ") :])
    return out


def without_created(event: bytes) -> Any:
    """An event's JSON with the per-second `created` field removed (for comparisons)."""
    if event == b"[DONE]":
        return event
    data = orjson.loads(event)
    data.pop("created", None)
    return data


class RawClient:
    """An HTTP/1.1 request over a plain socket, for disconnects and byte-exact requests."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        url = urlsplit(base_url)
        assert url.hostname is not None and url.port is not None
        self.sock = socket.create_connection((url.hostname, url.port), timeout=timeout)
        self.host = f"{url.hostname}:{url.port}"
        self.received = b""

    def send(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_length: int | None = None,
    ) -> None:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}"]
        hdrs = {"content-type": "application/json", **(headers or {})}
        hdrs["content-length"] = str(len(body) if content_length is None else content_length)
        lines += [f"{k}: {v}" for k, v in hdrs.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def post_json(self, target: str, data: dict[str, Any]) -> None:
        self.send("POST", target, orjson.dumps(data))

    def read_until(self, marker: bytes, count: int = 1, within: float = 10.0) -> bytes:
        """Read until `marker` occurs `count` times in what was received; returns all of it."""
        deadline = time.monotonic() + within
        while self.received.count(marker) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {marker!r} x{count} in {self.received[:500]!r}")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed early: {self.received[:500]!r}")
            self.received += chunk
        return self.received

    def read_response(self, within: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        """A whole response with Content-Length (error answers are not chunked)."""
        head = self.read_until(b"\r\n\r\n", within=within)
        raw_head, _, rest = head.partition(b"\r\n\r\n")
        status_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            self.sock.settimeout(within)
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return int(status_line.split(" ")[1]), headers, rest[:length]

    def close(self) -> float:
        """Close now; returns the time.monotonic() of the close."""
        self.sock.close()
        return time.monotonic()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
