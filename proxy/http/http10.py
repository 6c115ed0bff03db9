"""Responses to HTTP/1.0 requests: a body of unknown length is framed by the connection's end.

HTTP/1.0 has no chunked transfer coding (RFC 9112 6.1: a server must not send one to a 1.0
request), but uvicorn frames every response without Content-Length as chunked, whatever the
request's version: a stream to a client behind a proxy speaking 1.0 (nginx's default
`proxy_http_version`) would arrive with chunk sizes in its bytes. A cycle of a 1.0 request
sends such a body as it is and ends it by closing the connection. A response with
Content-Length is left to uvicorn, which closes after it too: 1.0 clients never get
keep-alive (uvicorn's choice, kept: `Connection: keep-alive` from 1.0 is rarely honest).
"""

from __future__ import annotations

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

# Stands for "until the connection closes" in uvicorn's count of body bytes still to send.
_UNTIL_CLOSE = 1 << 62


class CloseFramedCycle(RequestResponseCycle):
    """uvicorn's cycle for a 1.0 request; `close_framed(cycle)` turns a new cycle into one."""

    _until_close = False

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            headers = message.get("headers", [])
            if (
                message["status"] not in (204, 304)
                and self.scope["method"] != "HEAD"
                and not any(name.lower() == b"content-length" for name, _ in headers)
            ):
                # Neither chunked (uvicorn's choice) nor a length: the close ends the body.
                self._until_close = True
                self.keep_alive = False
                self.chunked_encoding = False
                self.expected_content_length = _UNTIL_CLOSE
        elif (
            self._until_close
            and message["type"] == "http.response.body"
            and not message.get("more_body", False)
        ):
            # The last piece: uvicorn then finds nothing left to send and closes.
            self.expected_content_length = len(message.get("body", b""))
        await super().send(message)


def close_framed(cycle: RequestResponseCycle) -> None:
    """Make the cycle of a just-parsed 1.0 request frame a length-less body by closing.

    Its task was created but has not run: it looks `send` up on the cycle when it starts.
    """
    cycle.__class__ = CloseFramedCycle
