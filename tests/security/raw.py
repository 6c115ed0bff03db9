"""Byte-exact HTTP/1.1 over a plain socket: what no client library would send, and how the
server answered it, including whether it closed the connection."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

import orjson

CHAT_PATH = "/v1/chat/completions"


def chat_body(**extra: Any) -> bytes:
    body: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 2,
    }
    body.update(extra)
    return orjson.dumps(body)


def request(
    body: bytes = b"",
    *,
    target: str = CHAT_PATH,
    method: str = "POST",
    headers: list[tuple[str, str]] | None = None,
    length: bool = True,
    host: str = "127.0.0.1",
) -> bytes:
    """A request head (plus `body`); Content-Length is added unless `length` is False."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    if body and method == "POST":
        lines.append("Content-Type: application/json")
    if length:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(body: bytes, size: int = 7) -> bytes:
    """`body` in chunked transfer coding, `size` bytes per chunk, with the last chunk."""
    parts = [
        b"%x\r\n%b\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        """The OpenAI error object of a JSON error answer (asserting its shape)."""
        assert self.headers.get("content-type", "").startswith("application/json"), self
        error: dict[str, Any] = orjson.loads(self.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str)
        assert error["message"]
        return error


class Conn:
    """One connection to the server at `port`."""

    def __init__(self, port: int, timeout: float = 10.0, source: str | None = None) -> None:
        # `source`: the client's address (any 127.x.y.z is this host's loopback too).
        bind = (source, 0) if source is not None else None
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=bind
        )
        self.opened = time.monotonic()
        self.buffer = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Read once; False on end of stream (or a reset)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"nothing more within the deadline; have {self.buffer[:300]!r}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def _until(self, marker: bytes, deadline: float) -> bytes:
        while marker not in self.buffer:
            if not self._fill(deadline):
                raise ConnectionError(f"closed before {marker!r}; have {self.buffer[:300]!r}")
        before, _, self.buffer = self.buffer.partition(marker)
        return before

    def _exactly(self, n: int, deadline: float) -> bytes:
        while len(self.buffer) < n:
            if not self._fill(deadline):
                raise ConnectionError(f"closed after {len(self.buffer)} of {n} bytes")
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def response(self, within: float = 10.0) -> Response:
        """The next whole response (Content-Length or chunked body)."""
        deadline = time.monotonic() + within
        head = self._until(b"\r\n\r\n", deadline).decode("latin-1")
        status_line, *lines = head.split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(status_line.split(" ")[1])
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(self._until(b"\r\n", deadline).split(b";")[0], 16)
                if size == 0:
                    self._until(b"\r\n", deadline)
                    break
                body += self._exactly(size, deadline)
                self._exactly(2, deadline)
        else:
            body = self._exactly(int(headers.get("content-length", "0")), deadline)
        return Response(status, headers, body)

    def closed(self, within: float = 3.0) -> bool:
        """True once the server ends the connection within `within` s (data is kept)."""
        deadline = time.monotonic() + within
        try:
            while self._fill(deadline):
                pass
        except (TimeoutError, OSError):
            return False
        return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
